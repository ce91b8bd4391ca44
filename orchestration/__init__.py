"""The ``lwm`` CLI, stage plans and their launchers, run lineage and the demo: the top layer.

``cli`` is the entry point and ``commands`` holds one module per command group
(each a thin layer over one library call); ``stages`` runs stage plans on any
backend; ``launch`` starts ``lwm train`` in one or several processes; ``demo`` is
the whole workflow on generated sample data. It may import every other package.
"""
