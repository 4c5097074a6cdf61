"""configs/demo_dp.yaml runs as one command: without --sites the generated demo cohort has the
sites the config names plus three public ones to train its public checkpoint on."""

from pathlib import Path

from umeml.config import load_config
from umeml.server.cli import demo_sites_for

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_generated_cohort_has_the_config_sites_and_the_public_ones():
    dp = load_config(CONFIGS / "demo_dp.yaml")
    assert dp.federation.init_checkpoint is None and dp.train.trainable != "all"
    assert demo_sites_for(dp) == 7  # A0-A2 private, A3 held out, A4-A6 public
    assert demo_sites_for(load_config(CONFIGS / "demo.yaml")) == 4
