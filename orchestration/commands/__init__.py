"""`lwm` sub-command groups; each module exposes ``register(subparsers)``."""
