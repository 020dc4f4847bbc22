"""Redis key names of the experiments service (all in the tenant's hash slot), and its channel.

  lp:{tenant}:experiment:<key>                          string  JSON definition
  lp:{tenant}:experiments                               zset    experiment keys (score 0)
  lp:{tenant}:experiment:<key>:sticky:<bucket_version>  hash    unit id -> variant index
  lp:{tenant}:experiment:<key>:units:<bucket_version>   hash    variant index -> units assigned;
      "<index>:a" -> Assign calls answered in the experiment, "<index>:a2" -> sum over the
      variant's units of (their Assign calls)^2 (the design effect of request-level metrics)
  lp:{tenant}:experiment:<key>:calls:<bucket_version>   hash    unit id -> its Assign calls
  lp:{tenant}:experiment:<key>:seq:<bucket_version>     hash    "<source>|<metric>|<variant>"
      -> the smallest always-valid p-value reported so far (its running minimum)
  lp:{tenant}:experiment:<key>:outcome:<bv>:<metric>:units  hash  unit id -> "count:total"
  lp:{tenant}:experiment:<key>:outcome:<bv>:<metric>        hash  "<variant index>:n|sum|sumsq"
      -> units, sum and sum of squares of the per-unit values (the statistics' inputs)

DEFINITIONS_CHANNEL carries {"tenant", "key"} for every write of a definition, so every
process that caches definitions (services.experiments.client) drops that one.
"""

from __future__ import annotations

from services.common.keys import PLATFORM, key

DEFINITIONS_CHANNEL = key(PLATFORM, "events", "experiment-definitions")


def experiment_key(tenant: str, exp_key: str) -> str:
    return key(tenant, "experiment", exp_key)


def experiment_index(tenant: str) -> str:
    return key(tenant, "experiments")


def sticky_key(tenant: str, exp_key: str, bucket_version: int) -> str:
    return key(tenant, "experiment", exp_key, "sticky", bucket_version)


def units_key(tenant: str, exp_key: str, bucket_version: int) -> str:
    return key(tenant, "experiment", exp_key, "units", bucket_version)


def calls_key(tenant: str, exp_key: str, bucket_version: int) -> str:
    return key(tenant, "experiment", exp_key, "calls", bucket_version)


def sequential_key(tenant: str, exp_key: str, bucket_version: int) -> str:
    return key(tenant, "experiment", exp_key, "seq", bucket_version)


def outcome_key(tenant: str, exp_key: str, bucket_version: int, metric: str) -> str:
    return key(tenant, "experiment", exp_key, "outcome", bucket_version, metric)
