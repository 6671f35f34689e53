"""Federated training without Flower: plain calls with plain inputs and outputs, by side.

- ``wire``: weights on the wire (flat keys, model constants that never travel, float16 transfer),
  payload kinds, validation of a site's update, the global weights at the start of a run;
- ``seeds``: seeds every party derives from (run seed, round, site);
- ``aggregation`` (server): site sampling, the weighted average, server optimizers (FedAvg,
  FedAvgM, FedAdam), weighted metrics, and ``aggregate_round``: one round's replies in, new global
  weights and a status per site out;
- ``server_state`` (server): what a round checkpoint carries, and resuming from it;
- ``partition`` (sites): flwr-datasets partitioners, the site x class table, a site's own data
  (the one module under ``medstylegan2/`` that imports Flower's packages);
- ``site_round`` (site): ``run_site_round`` and what a site keeps between rounds.

``server/`` and ``client/`` convert Flower records to and from these calls.
"""
