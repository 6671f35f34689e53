"""Differential privacy for each site's discriminator: DP-SGD on the real-data part of D's loss.

One module per piece, as Opacus keeps them apart:

- ``validation``: ``validate_discriminator``, before training: every layer of D that per-sample
  DP-SGD cannot handle, named, with what to use instead;
- ``per_sample``: ``per_sample_real_gradients``, exact per-sample gradients of the real-data loss
  (logistic + R1) with ``torch.func``;
- ``engine``: ``DPEngine`` (Poisson sampling, Opacus clip + noise, the accountant, its state across
  rounds), ``make_privacy_engine`` (from the config) and ``epsilon_of`` (epsilon of an accountant's
  history, e.g. one saved in a checkpoint).

The trainer owns D's step; it asks the engine for a Poisson batch and for the private gradient of
that batch's real-data loss (``medstylegan2.trainer.SiteTrainer.discriminator_step``). The threat
model is in ``docs/privacy.md``.
"""
