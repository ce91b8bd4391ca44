"""The vision data jobs: captioned images and videos → VQGAN codes → packed vision-language datasets.

``image_text`` and ``video_text`` are the two jobs (registered in :data:`pipelines.JOBS`);
``vision_text`` is the pipeline they share, ``examples`` lays out each example
(generation or understanding) with its loss weights.
"""
