"""The `anyway` command line (appliance.cli.main) and `anyway up`'s local cluster (appliance.cli.up)."""

from appliance.cli.main import main

__all__ = ["main"]
