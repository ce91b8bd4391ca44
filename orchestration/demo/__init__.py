"""``lwm demo`` (``workflow``) and the sample data it generates: books, captioned media, needle exercises."""
