"""Pin what users and scripts rely on: the error tree and its retry classification."""

from __future__ import annotations

import inspect

from batch_runner import errors


def _tree() -> dict[str, str]:
    classes = {
        name: obj
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == errors.__name__
    }
    return {name: cls.__mro__[1].__name__ for name, cls in classes.items()}


def test_error_tree_is_pinned() -> None:
    assert _tree() == {
        "BatchRunnerError": "Exception",
        "InputError": "BatchRunnerError",
        "ConfigError": "InputError",
        "ManifestError": "InputError",
        "WorkflowError": "InputError",
        "StoreError": "BatchRunnerError",
        "RunLocked": "StoreError",
        "RunnerSuperseded": "StoreError",
        "DatabaseLocked": "StoreError",
        "TransitionRejected": "StoreError",
        "SchemaError": "StoreError",
        "EndpointError": "BatchRunnerError",
        "AccessDenied": "EndpointError",
        "NotComfyUI": "EndpointError",
        "TransientError": "EndpointError",
        "EndpointUnavailable": "TransientError",
        "ServerError": "TransientError",
        "DownloadIncomplete": "TransientError",
        "ExecutionTransient": "TransientError",
        "PromptLost": "TransientError",
        "PermanentError": "EndpointError",
        "WorkflowRejected": "PermanentError",
        "ExecutionFailed": "PermanentError",
        "ExecutionInterrupted": "PermanentError",
        "OutputRejected": "PermanentError",
    }


def test_every_documented_error_is_exported() -> None:
    assert set(_tree()) | {"ManifestProblem"} == set(errors.__all__)
    for name in errors.__all__:
        assert name in (errors.__doc__ or "") or name == "ManifestProblem", name
