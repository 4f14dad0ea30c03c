"""Hypothesis profiles for the policy tests: HYPOTHESIS_PROFILE=ci (default) or nightly."""

from resilient.testing import load_hypothesis_profile

load_hypothesis_profile()
