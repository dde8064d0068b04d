"""e2e fixtures: two real control planes (``clusters``) built from `make testbin`.

A missing testbin makes these tests FAIL with a hint to run `make testbin`; they never skip.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.clusters import Clusters, start_clusters, stop_clusters

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Clusters]:
    """Clusters ``a`` and ``b``: etcd + kube-apiserver each, Istio CRDs and base objects installed."""
    workdir = tmp_path_factory.mktemp("clusters")
    t0 = time.monotonic()
    try:
        a, b = start_clusters(workdir)
    except pytest.fail.Exception:
        raise
    except Exception as e:
        pytest.fail(f"starting the e2e clusters failed: {e}", pytrace=False)
    print(f"\ne2e clusters a, b ready in {time.monotonic() - t0:.1f}s ({workdir})")
    try:
        yield Clusters(a=a, b=b)
    finally:
        stop_clusters([a, b])
