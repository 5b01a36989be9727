"""Direct calls to the ClearML API server, shared by the sink and ``steplog sync``.

A logger's sink talks to the server through its ``clearml.Task``; a sink reattached by
``steplog sync`` has no running Task and uses an API session of its own (:func:`session_for`)
to find the Task, merge parameters, set user properties and end the Task (:func:`end_task`),
whatever the Task's status. :func:`why_unreachable` is the quick check, at a logger's start, of
a server that would make ClearML retry for minutes.

Guarantees: every request of such a session has a deadline (it connects within the given time
and is answered within ``_SYNC_READ_S``; ClearML's own waits on a 503 or a ``Retry-After`` are
turned off), and every answer is an outcome or an error that says whether a retry can help:
:class:`~steplog.errors.RetryableError` without an answer, for 429 and 5xx;
:class:`~steplog.errors.PermanentError` (``whole_batch``) for a refusal of the request. No
credentials are ever written out (:func:`without_userinfo`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from steplog.errors import PermanentError, RetryableError
from steplog.retry import is_retryable
from steplog.sinks.base import RunStatus

__all__ = [
    "CONFIG_HELP",
    "configuration_problem",
    "configured_api_host",
    "end_task",
    "force_parameters",
    "refused_events",
    "response_text",
    "session_for",
    "set_properties",
    "task_info",
    "why_unreachable",
    "without_userinfo",
]

_SYNC_RETRIES = {"total": 2, "connect": 2, "read": 2, "redirect": 2, "status": 2,
                 "backoff_factor": 0.5}
"""HTTP retries of a reattached sink's session (ClearML's default retries for hours): the sync
retries on its own, until its deadline."""
_SYNC_READ_S = 60.0
"""Longest a reattached sink waits for the answer to one request."""
_RUNNING = ("created", "in_progress")

CONFIG_HELP = (
    "ClearML is not configured on this machine. Fix it in one of three ways: run `clearml-init` "
    "(writes ~/clearml.conf); or set CLEARML_API_HOST, CLEARML_API_ACCESS_KEY and "
    "CLEARML_API_SECRET_KEY; or record the run locally with offline=True (or "
    "CLEARML_OFFLINE_MODE=1)."
)


def _param_text(value: Any) -> str:
    """A parameter value as ``Task.update_parameters`` stores it."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, dict)):
        with contextlib.suppress(TypeError, ValueError):
            return json.dumps(value)
    return str(value)


def without_userinfo(url: str) -> str:
    """``url`` without a ``user:password@`` part (never written to ``run.json``)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def session_for(host: str, timeout_s: float) -> Any:
    """A ClearML API session with the server at ``host`` and this machine's credentials; its
    requests give up after a few tries (the caller retries until its own deadline)."""
    if configuration_problem() is not None:
        raise PermanentError(
            f"ClearML has no credentials on this machine for the task on {host}: set "
            "CLEARML_API_ACCESS_KEY and CLEARML_API_SECRET_KEY, or run clearml-init",
            whole_batch=True)
    why = why_unreachable(host, timeout_s)
    if why is not None:
        raise RetryableError(why)
    from clearml import Task
    from clearml.backend_api import Session

    if Task.is_offline():  # CLEARML_OFFLINE_MODE, or an offline logger earlier in this process
        if Task.current_task() is not None:
            raise PermanentError("an offline ClearML task runs in this process: sync into a "
                                 "ClearML server from another process", whole_batch=True)
        Task.set_offline(False)
    try:
        session = Session(host=host, http_retries_config=dict(_SYNC_RETRIES))
    except Exception as exc:
        if is_retryable(exc):
            raise
        raise PermanentError(f"could not log in to the ClearML API server {host}: {exc}",
                             whole_batch=True) from exc
    _bound_waits(session, timeout_s)
    return session


class _NoMaintenanceWait:
    """A ClearML configuration that answers ``api.http.wait_on_maintenance_forever`` with
    False, and everything else as ``config`` does."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def get(self, key: str, default: Any = None) -> Any:
        if key == "api.http.wait_on_maintenance_forever":
            return False
        return self._config.get(key, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)


def _bound_waits(session: Any, connect_s: float) -> None:
    """Give a reattached sink's session deadlines: by default it resends a request for as long
    as the server answers 503 (maintenance), honours ``Retry-After`` up to hours, and reads an
    answer for up to 300 s. Now a 503 is an answer (retried by the sync within its deadline),
    ``Retry-After`` is ignored, and each request connects within ``connect_s`` and gets its
    answer within ``_SYNC_READ_S``."""
    session.config = _NoMaintenanceWait(session.config)
    for name in ("_session_initial_timeout", "_session_timeout", "_write_session_timeout"):
        setattr(session, name, (connect_s, _SYNC_READ_S))
    http = getattr(session, "_Session__http_session", None)
    for adapter in getattr(http, "adapters", {}).values():
        retries = getattr(adapter, "max_retries", None)
        if retries is not None:
            retries.respect_retry_after_header = False


def _checked(res: Any, what: str) -> Any:
    """The response of a ClearML API call, or the error its answer means: retryable without an
    answer, for 429 and 5xx; otherwise a refusal of the whole request (no such task, no
    permission, a published task)."""
    if res is None:
        raise RetryableError(f"ClearML {what}: no answer")
    code = res.meta.result_code
    if code == 200:
        return res.response
    message = f"ClearML {what} answered {code}: {res.meta.result_msg}"
    if code == 429 or code >= 500:
        raise RetryableError(message)
    raise PermanentError(message, whole_batch=True)


def task_info(session: Any, task_id: str) -> Any:
    """The Task ``task_id`` as the server holds it (``tasks.get_by_id``)."""
    from clearml.backend_api.services import tasks as api_tasks

    return _checked(session.send(api_tasks.GetByIdRequest(task=task_id)),
                    f"tasks.get_by_id {task_id}").task


def force_parameters(session: Any, task_id: str, params: dict[str, Any]) -> None:
    """Merge ``params`` (``General/name`` keys) into the Task's hyperparameters whatever its
    status: the ``tasks.edit`` request (``force``) that ``Task.update_parameters`` sends while a
    Task runs, with the values and types it would write. The server refuses
    ``tasks.edit_hyper_params`` for a Task that ended, and a sync usually comes after."""
    from clearml.backend_api.services import tasks as api_tasks
    from clearml.utilities.proxy_object import get_basic_type

    info = task_info(session, task_id)
    hyperparams = {section: dict(items or {})
                   for section, items in (info.hyperparams or {}).items()}
    general = hyperparams.setdefault("General", {})
    for key, value in params.items():
        name = key.partition("/")[2]
        old = general.get(name)
        kind = getattr(old, "type", None) or (None if value is None else get_basic_type(value))
        general[name] = api_tasks.ParamsItem(section="General", name=name,
                                             value=_param_text(value), type=kind,
                                             description=getattr(old, "description", None))
    _checked(session.send(api_tasks.EditRequest(task=task_id, force=True,
                                                hyperparams=hyperparams)), "tasks.edit")


def set_properties(session: Any, task_id: str, props: Mapping[str, str]) -> None:
    """Set user properties of the Task (the server allows this whatever its status)."""
    from clearml.backend_api.services import tasks as api_tasks

    items = [api_tasks.ParamsItem(section="properties", name=k, value=str(v))
             for k, v in props.items()]
    _checked(session.send(api_tasks.EditHyperParamsRequest(
        task=task_id, hyperparams=items, replace_hyperparams="none")),
        "tasks.edit_hyper_params")



def end_task(session: Any, task_id: str, status: RunStatus) -> None:
    """Record ``status`` (property ``steplog.status``) on the Task and end it with that status
    when it still runs (its logger could not end it); a Task that ended keeps the status it
    has."""
    from clearml.backend_api.services import tasks as api_tasks

    set_properties(session, task_id, {"steplog.status": status})
    info = task_info(session, task_id)
    if getattr(info.status, "value", info.status) not in _RUNNING:
        return
    reason = f"the training process ended with {status}"
    if status == "FINISHED":
        request: Any = api_tasks.CompletedRequest(task=task_id, force=True)
    elif status == "FAILED":
        request = api_tasks.FailedRequest(task=task_id, force=True, status_reason=reason)
    else:
        request = api_tasks.StoppedRequest(task=task_id, force=True, status_message=reason)
    _checked(session.send(request), f"ending task {task_id}")


def refused_events(res: Any) -> str | None:
    """What ClearML reports as refused in a 200 answer of events.add_batch, or ``None``."""
    try:
        data = res.json().get("data") or {}
    except Exception:
        return None
    errors = data.get("errors") or 0
    if not errors:
        return None
    return f"{errors} of {data.get('added', 0) + errors} events: {data.get('errors_info')}"


def response_text(res: Any) -> str:
    try:
        return str(res.json().get("meta", {}).get("result_msg") or res.text)[:500]
    except Exception:
        return str(getattr(res, "text", ""))[:500]


def configuration_problem() -> str | None:
    """``None`` when ClearML has credentials (environment or ``clearml.conf``)."""
    env = os.environ
    if env.get("CLEARML_AUTH_TOKEN") or (
        env.get("CLEARML_API_ACCESS_KEY") and env.get("CLEARML_API_SECRET_KEY")
    ):
        return None
    from clearml.config import config_obj

    try:
        key = config_obj.get("api.credentials.access_key", None)
        secret = config_obj.get("api.credentials.secret_key", None)
    except Exception:
        key = secret = None
    return None if key and secret else CONFIG_HELP


def configured_api_host() -> str:
    from clearml.backend_api import Session

    return str(Session.get_api_server_host())


def why_unreachable(url: str, timeout_s: float) -> str | None:
    """Why ClearML's API server at ``url`` cannot serve this run (``None`` when it can): no
    answer to ``debug.ping`` within ``timeout_s``, a 5xx answer, or a certificate that does not
    verify. ClearML itself retries each of these for minutes (a 503 forever); with ClearML's
    own proxy and certificate settings, as its session would connect."""
    import requests
    from clearml.backend_api.session.defs import ENV_HOST_VERIFY_CERT
    from clearml.config import config_obj

    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("http", "https"):
        return f"the ClearML API server {url!r} is not an http(s) URL"
    verify: Any = ENV_HOST_VERIFY_CERT.get(default=config_obj.get("api.verify_certificate", True))
    if isinstance(verify, str):
        verify = verify.strip().lower() not in ("0", "false", "no", "off")
    try:
        res = requests.get(url.rstrip("/") + "/debug.ping", timeout=timeout_s, verify=verify)
    except requests.exceptions.SSLError as exc:
        return f"the ClearML API server {url}'s certificate did not verify ({exc})"
    except requests.RequestException as exc:
        return f"the ClearML API server {url} did not answer within {timeout_s:g} s ({exc})"
    if res.status_code >= 500:
        return f"the ClearML API server {url} answered HTTP {res.status_code}"
    return None
