"""Differential privacy for each site's discriminator, decided by the site itself.

DP-SGD on the real-data part of D's loss, one module per piece, as Opacus keeps them apart:

- ``validation``: ``validate_discriminator``, before training: every layer of D that per-sample
  DP-SGD cannot handle, named, with what to use instead;
- ``per_sample``: ``per_sample_real_gradients``, exact per-sample gradients of the real-data loss
  (logistic + R1 + class head) with ``torch.func``; ``units``: patients as the unit of privacy;
- ``engine``: ``DPEngine`` (Poisson sampling, Opacus clip + noise, the accountant),
  ``make_privacy_engine`` (from the config, for ``train-local``) and ``epsilon_of``;
- ``accounting``: epsilon of a (sigma, q, steps) history, sigma for a target, with Opacus.
- ``fake_term``: D's fake-image term clipped per sample like the real one (``train.dp_clip_fakes``;
  balance, not privacy: fakes are not private).
- ``public_term``: the public Normal set of D's real term on public images (``train.public_real_weight``;
  outside the clip and the noise: it reads no private record).

The site's side of the trust boundary (issue 10, docs/privacy.md):

- ``policy``: the site's own policy file; ``request``: what the server asks and the site's answer;
- ``ledger``: the lifetime ledger of the site's data set (hash chain, lock, fsync);
- ``site``: one round under the policy: lock, request check, budget check, train, record, reply;
- ``reply``: what a reply may carry under DP;
- ``audit``, ``audit_command``: membership-inference attacks, ``medstylegan2 audit-privacy``.

The trainer owns D's step; it asks the engine for a Poisson batch and for the private gradient of
that batch's real-data loss (``medstylegan2.trainer.SiteTrainer.discriminator_step``).
"""
