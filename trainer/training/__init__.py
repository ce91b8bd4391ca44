"""Training: the Grain loader and its saved position, the optimizer, and the train loop (``lwm train``)."""
