"""Every place kiln reaches into a library's internals, named once. Ray and Typer are pinned in
pyproject.toml; an upgrade that moves one of these fails its test (tests/test_compat.py) and
fails here with the library's own ImportError or AttributeError, never silently falling back
to other behaviour. Each is imported when asked for: importing this module imports no Ray.
Ray Data's logging config (cluster/ray_data_logging.yaml) names three of Ray's internal classes
too; the same tests import each."""

from __future__ import annotations

# Ray Train V2 ------------------------------------------------------------------------------

# TorchTrainer's private methods that kiln's trainer (kiln.train.fit.trainer_class) overrides:
# the first receives the controller's keyword arguments, FAILURE_POLICY_ARG among them; the
# second lists the run's callbacks, the datasets callback among them.
RUN_CONTROLLER = "_initialize_and_run_controller"
DEFAULT_CALLBACKS = "_create_default_callbacks"
FAILURE_POLICY_ARG = "failure_policy"


def train_report_logger() -> str:
    """The name of the logger that writes Train V2's INFO line at every report: the file path
    of the module that holds it."""
    from ray.train.v2._internal.execution import context

    return context.__file__


def worker_health_errors() -> tuple[type, type]:
    """(failed, timed out): how Train V2 reports a worker that died or hung; `failed` holds the
    worker's own error as .health_check_failure."""
    from ray.train.v2._internal.exceptions import (
        WorkerHealthCheckFailedError,
        WorkerHealthCheckTimeoutError,
    )

    return WorkerHealthCheckFailedError, WorkerHealthCheckTimeoutError


def failure_policy() -> tuple[type, type]:
    """(DefaultFailurePolicy, FailureDecision): the policy Train V2 builds from FailureConfig,
    whose make_decision(error) kiln narrows, and the decisions it returns."""
    from ray.train.v2._internal.execution.failure_handling import (
        DefaultFailurePolicy,
        FailureDecision,
    )

    return DefaultFailurePolicy, FailureDecision


def datasets_callback() -> type:
    """The callback that Train V2 adds to every run to start a dataset manager actor."""
    from ray.train.v2._internal.callbacks import DatasetsCallback

    return DatasetsCallback


# Ray core ----------------------------------------------------------------------------------


def reread_ray_config() -> None:
    """Makes Ray, imported before RAY_AUTH_MODE was set, read its configuration again."""
    from ray._raylet import Config

    Config.initialize("")


def generate_auth_token() -> None:
    """Writes ~/.ray/auth_token, as `ray get-auth-token --generate` does."""
    from ray._private.authentication.authentication_token_setup import generate_and_save_token

    generate_and_save_token()


def session_logs_dir() -> str:
    """The log folder of this process's Ray session (where every worker's output is kept);
    no public API has it. Ray must be initialized."""
    import ray

    return ray._private.worker._global_node.get_logs_dir_path()


def placement_groups() -> tuple[list, tuple]:
    """Every placement group the GCS knows, as its record (gcs_pb2.PlacementGroupTableData:
    placement_group_id, creator_actor_id, creator_actor_dead, creator_job_id, is_detached,
    state), and the states a live group is in."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    table = gcs_pb2.PlacementGroupTableData
    records = [table.FromString(raw)
               for raw in state._connect_and_get_accessor().get_placement_group_table()]
    return records, (table.PENDING, table.PREPARED, table.CREATED, table.RESCHEDULING)


def ray_address_file() -> str:
    """Where Ray records the address of the cluster this machine started last (a
    ray.cluster_utils.Cluster writes it: bench/tune.py and the tests make its folder)."""
    from ray._private.utils import get_ray_address_file

    return get_ray_address_file(None)


# The loggers of Ray's own that kiln quiets, by name.
RAY_QUIET_LOGGERS = ("ray.dashboard.modules.job.sdk", "ray._private.runtime_env.packaging")


# Typer -------------------------------------------------------------------------------------


def click_exceptions() -> tuple[type, type]:
    """(NoArgsIsHelpError, UsageError) of the Click that Typer runs: Typer 0.29 carries its
    own copy of Click, inside its private package."""
    from typer._click.exceptions import NoArgsIsHelpError, UsageError

    return NoArgsIsHelpError, UsageError
