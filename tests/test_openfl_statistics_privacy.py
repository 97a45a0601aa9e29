"""DP on shared statistics is not a silent no-op in an OpenFL federation: init-federation refuses
it with a one-line reason (the collaborators do not add the noise yet)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedfair_med.runtime.openfl.workspace import FederationError, render_plan

PRIVATE = {"privacy": {"statistics_epsilon": 1.0, "statistics_delta": 1e-5},
           "method_params": {"lam": 1.0}}


@pytest.mark.parametrize("method", ["flexfair-ea", "flexfair-dp"])
def test_render_plan_refuses_private_statistics(method):
    task = "synthetic-seg" if method == "flexfair-ea" else "synthetic-cls"
    with pytest.raises(FederationError, match="statistics_epsilon.*simulate"):
        render_plan(method, task=task, sites=["site-a", "site-b"], overrides=PRIVATE)
    plan = render_plan(method, task=task, sites=["site-a", "site-b"],
                       overrides={"method_params": {"lam": 1.0}})
    assert plan.config.method == "flexfair"


def test_init_federation_says_why_in_one_line(tmp_path):
    import yaml

    from fedfair_med.cli.main import app

    (tmp_path / "run.yaml").write_text(yaml.safe_dump(PRIVATE))
    result = CliRunner().invoke(app, [
        "init-federation", "f", "--task", "synthetic-seg", "--method", "flexfair-ea",
        "--sites", "site-a,site-b", "--config", str(tmp_path / "run.yaml"),
        "--workspaces-dir", str(tmp_path / "ws")])
    assert result.exit_code != 0
    assert "statistics_epsilon" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ws" / "f").exists()
