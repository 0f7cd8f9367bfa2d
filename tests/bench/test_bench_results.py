"""Committed benchmark results describe the code beside them (``bench/provenance.py``)."""

from __future__ import annotations

import json

import pytest

from poegen.bench import provenance

RESULTS = provenance.REPO / "bench" / "results"


@pytest.mark.parametrize("name", ["accuracy", "digits", "kernel_figures", "apps"])
def test_a_committed_result_is_not_older_than_the_code_it_measures(name):
    data = json.loads((RESULTS / f"{name}.json").read_text())
    origin = data.get("provenance")
    assert origin, f"bench/results/{name}.json has no provenance: rerun bench/{name}.py"
    assert not origin["dirty"], f"{name}.json was made from uncommitted code"
    assert origin["measures"] == list(provenance.MEASURES[name])
    changed = provenance.changed_since(origin["commit"], origin["measures"])
    assert not changed, (
        f"bench/results/{name}.json was made at {origin['commit'][:10]}; since then "
        f"{changed[:5]} changed: rerun bench/{name}.py"
    )


def test_the_check_sees_a_change():
    """changed_since names what changed between two commits (here: the first commit and HEAD,
    between which kernel/ certainly changed)."""
    first = provenance._git("rev-list", "--max-parents=0", "HEAD").splitlines()[0]
    assert provenance.changed_since(first, ["kernel"])
