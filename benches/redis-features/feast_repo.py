"""Builds the Feast feature repository for benches/redis-features/run.sh.

usage: python feast_repo.py VALUES.csv REPO_DIR REDIS_PORT

VALUES.csv is what `redis_features fill` wrote (customer_id,f00,...,f19): the same
customers and the same values as Tailor's hashes. Writes REPO_DIR/values.parquet (one
row per customer, stamped an hour ago), feature_store.yaml (online store: the Redis on
REDIS_PORT; registry and offline store: local files) and features.py (entity
customer_id, one feature view `customer_features` with the 20 float features).
"""

import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd

values, repo, port = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
repo.mkdir(parents=True, exist_ok=True)

frame = pd.read_csv(values)
frame["customer_id"] = frame["customer_id"].astype("int64")
frame["event_timestamp"] = datetime.now(timezone.utc) - timedelta(hours=1)
frame.to_parquet(repo / "values.parquet", index=False)

(repo / "feature_store.yaml").write_text(
    f"""project: tailor_bench
registry: registry.db
provider: local
online_store:
  type: redis
  connection_string: "127.0.0.1:{port}"
offline_store:
  type: file
entity_key_serialization_version: 3
"""
)

(repo / "features.py").write_text(
    f'''from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Float64

customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)

source = FileSource(path="{(repo / "values.parquet").resolve()}", timestamp_field="event_timestamp")

customer_features = FeatureView(
    name="customer_features",
    entities=[customer],
    ttl=timedelta(days=3650),
    schema=[Field(name=f"f{{j:02}}", dtype=Float64) for j in range(20)],
    online=True,
    source=source,
)
'''
)
