"""The privacy-utility study without Flower: its typed config, the arms' run configs, the shared
evaluation, and the outputs (``study.json``, ``study.md``, ``utility.png``, ``arms.png``).

The ``study`` command (``simulation/study.py``) trains every arm through the project's Flower
simulation and calls into this module for everything else. Inputs and outputs:

- ``configs/study.yaml`` -> ``StudyConfig``: a base run config, profiles (``quick``, ``full``: model
  overrides, compute per arm, images per class for evaluation, seeds) and arms (sites,
  partitioner, privacy, warm start from public data);
- a finished arm's checkpoint -> ``evaluate_checkpoint``: CAS, TSTR relative to real-trained,
  FD-domain, LPIPS diversity and LPIPS to the nearest real image, all from the same number of
  generated images and the same real-trained domain classifier for every arm;
- the arms' results -> ``write_outputs``: ``study.json`` (the contract below), a markdown table and
  the two figures.

``study.json``::

    {"profile": "quick" | "full",
     "arms": {"<arm>": {"checkpoint": "<path relative to DIR>", "epsilon": float | null,
                        "cas": float, "tstr_relative": float, "fd_domain": float,
                        "lpips_diversity": float, "minutes": float}}}

With several seeds an arm's figures are the mean over seeds (``checkpoint`` is the first seed's);
each seed's own figures are in ``<arm>/seed-<s>/arm.json``.

Modules: ``study.config`` (the YAML, the arms' run configs, the public stand-in data),
``study.evaluate`` (the evaluation every arm gets) and ``study.report`` (the outputs).
"""
