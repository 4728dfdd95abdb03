"""The dashboard's screens: cluster overview, node detail, chat, help and the confirmation dialog."""
