"""`python -m appliance.engine`: the engine process, started by the head."""

import sys

from appliance.engine.process import main

sys.exit(main())
