"""Helpers for tests/test_ansible.py: namespace test hosts reached over SSH, and a stand-in
for systemd that starts services from the rendered unit files."""
