"""kiln.compat: every internal of Ray and Typer that kiln uses is where kiln.compat says, in the
versions pyproject.toml pins. A test here failing after an upgrade names the one that moved."""

import inspect
import logging
import sys
import time
from pathlib import Path

import pytest
import yaml

from kiln import compat


def test_importing_compat_imports_no_library():
    import subprocess

    probe = ("import sys, kiln.compat; "
             "print(sorted(m for m in ('ray', 'typer', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_train_v2_internals_are_where_kiln_looks():
    from ray.train.v2.api.callback import RayTrainCallback

    failed, timed_out = compat.worker_health_errors()
    assert issubclass(failed, BaseException) and issubclass(timed_out, BaseException)
    cause = ValueError("the worker's own error")
    assert failed("a worker died", cause).health_check_failure is cause
    policy, decision = compat.failure_policy()
    assert callable(policy.make_decision) and {"RAISE", "RETRY"} <= set(decision.__members__)
    assert issubclass(compat.datasets_callback(), RayTrainCallback)
    assert Path(compat.train_report_logger()).is_file()


def test_kilns_trainer_overrides_methods_torchtrainer_has_and_calls():
    """trainer_class overrides TorchTrainer's private methods by name; Ray must still have them
    and still hand the controller its failure policy by that keyword."""
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    from kiln.train.fit import trainer_class

    ours = trainer_class()
    for name in (compat.RUN_CONTROLLER, compat.DEFAULT_CALLBACKS):
        assert name in vars(ours), name  # kiln overrides exactly these
        assert callable(getattr(TorchTrainer, name)), name
    caller = inspect.getsource(DataParallelTrainer)
    assert f"{compat.RUN_CONTROLLER}(" in caller
    assert f"{compat.FAILURE_POLICY_ARG}=" in caller
    assert f"callbacks=self.{compat.DEFAULT_CALLBACKS}()" in caller


@pytest.fixture
def placement_group_records(ray_local):
    """The GCS's record of a placement group, by its id, read through kiln.compat."""
    def record(group_id: bytes):
        (found,) = [r for r in compat.placement_groups()[0] if r.placement_group_id == group_id]
        return found

    return record


def test_ray_core_internals_are_where_kiln_looks(placement_group_records, tmp_path,
                                                 monkeypatch):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([{"CPU": 0.01}])
    try:
        ray.get(group.ready(), timeout=60)
        ours = placement_group_records(group.id.binary())
        assert ours.state in compat.placement_groups()[1] and not ours.is_detached
        assert ours.creator_job_id.hex() == ray.get_runtime_context().get_job_id()
        # made by the driver, not an actor: no creator actor, which Ray marks dead
        assert ray.ActorID(ours.creator_actor_id).is_nil() and ours.creator_actor_dead
    finally:
        remove_placement_group(group)
    assert Path(compat.session_logs_dir()).is_dir()
    compat.reread_ray_config()
    monkeypatch.setenv("HOME", str(tmp_path))
    compat.generate_auth_token()
    assert len((tmp_path / ".ray" / "auth_token").read_text().strip()) >= 16
    assert Path(compat.ray_address_file()).name


def test_a_placement_group_of_an_actor_that_died_shows_so(placement_group_records):
    """kiln tune frees the CPUs of a stopped trial by finding the placement groups whose
    creator actor (Ray Train's controller) has died: the GCS record says which."""
    import ray

    @ray.remote(num_cpus=0)
    class Maker:
        def make(self) -> bytes:
            from ray.util.placement_group import placement_group

            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready(), timeout=60)
            return group.id.binary()

    maker = Maker.remote()
    group_id = ray.get(maker.make.remote(), timeout=120)
    made = placement_group_records(group_id)
    assert not ray.ActorID(made.creator_actor_id).is_nil() and not made.creator_actor_dead
    ray.kill(maker)
    deadline = time.monotonic() + 60
    while not placement_group_records(group_id).creator_actor_dead:
        assert time.monotonic() < deadline, "the creator's death never reached the record"
        time.sleep(0.2)


def test_the_ray_loggers_kiln_quiets_exist():
    import ray.dashboard.modules.job.sdk  # noqa: F401
    from ray._private.runtime_env import packaging  # noqa: F401

    for name in compat.RAY_QUIET_LOGGERS:
        assert name in sys.modules, name  # a module of that name exists
        assert name in logging.Logger.manager.loggerDict, name  # and logs under its name


def test_the_ray_data_logging_config_names_classes_ray_has():
    """Ray Data's logging config (kiln.cluster's YAML) names Ray's internal handler and filter
    classes; each must import."""
    import importlib

    from kiln.cluster.connect import RAY_DATA_LOGGING

    config = yaml.safe_load(Path(RAY_DATA_LOGGING).read_text())
    named = [h["class"] for h in config["handlers"].values()]
    named += [f["()"] for f in config["filters"].values()]
    assert len(named) == 3
    for dotted in named:
        module, name = dotted.rsplit(".", 1)
        assert isinstance(getattr(importlib.import_module(module), name), type), dotted
    # and the loggers it sets apart are modules of Ray Data's
    for name in config["loggers"]:
        importlib.import_module(name)


def test_typers_click_exceptions_are_where_kiln_looks():
    no_args, usage = compat.click_exceptions()
    assert issubclass(no_args, usage)  # `kiln` alone is a usage error that shows the help
    with pytest.raises(usage):
        from kiln.cli import app

        app(["no-such-command"], standalone_mode=False)
