"""config.profile_steps: a jax.profiler trace of the chosen steps under WORKDIR/profile (locally, or copied into a
bucket), and nothing without it."""

from helpers.train import small_config
import pytest

from kimi_jax.train import train
from kimi_jax.training.guards import parse_profile_steps


def traces(root):
  return sorted(p.name for p in root.rglob("*.xplane.pb"))


def test_a_trace_of_the_chosen_steps_and_none_without(tmp_path):
  c = small_config(3)
  c.profile_steps = "2:3"
  train(c, str(tmp_path / "traced"))
  assert traces(tmp_path / "traced" / "profile")  # plugins/profile/<run>/<host>.xplane.pb
  train(small_config(3), str(tmp_path / "plain"))
  assert not (tmp_path / "plain" / "profile").exists()


def test_a_trace_in_a_bucket(gcs, tmp_path):
  bucket = gcs.create_bucket("kimi-jax-profile")
  c = small_config(2)
  c.profile_steps = "1:1"
  train(c, f"gs://{bucket}/run")
  assert [n for n in gcs.list_objects(bucket, "run/profile/") if n.endswith(".xplane.pb")]


@pytest.mark.parametrize("spec", ["3", "0:2", "4:2", "a:b", "1:2:3"])
def test_bad_profile_steps_are_named(spec):
  with pytest.raises(ValueError, match="config.profile_steps"):
    parse_profile_steps(spec)
  assert parse_profile_steps("") is None and parse_profile_steps("2:5") == (2, 5)
