"""What a site's reply holds: the records and metric keys the centre expects, nothing else.

A hospital builds its replies to this schema; the centre drops any reply that departs from it
(a missing or extra record or metric key, a value of the wrong kind) before it is aggregated.
"""

from __future__ import annotations

ARRAYS, METRICS, SITE = "arrays", "metrics", "site"  # the records of a reply, by name
# A training message may ask the site to evaluate the model it brings first: the reply then
# also holds that evaluation; if the training then fails, the failure's class in its place.
EVALUATION, FAILURE = "evaluation", "failure"
TRAIN_RECORDS = frozenset({ARRAYS, METRICS, SITE})
EVALUATE_RECORDS = frozenset({METRICS, SITE})

EXAMPLES = "num-examples"  # training or validation tiles: FedAvg's weight
SITE_WEIGHT = "site-weight"  # always 1: for aggregations that count sites, not tiles
CONFUSION = "confusion"  # evaluate: the class-by-class confusion counts, row-major
NOISE = "noise_multiplier"  # train: the DP-SGD noise multiplier of the round (-1 without DP)
TRAIN_METRICS = frozenset({"train_loss", EXAMPLES, "train_s", "epsilon", NOISE, SITE_WEIGHT,
                           "steps"})
EVALUATE_METRICS = frozenset({"dice", "miou", "acc", "loss", EXAMPLES, CONFUSION, SITE_WEIGHT})
