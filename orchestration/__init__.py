"""The `lwm` CLI, stage plans, launchers and run lineage."""
