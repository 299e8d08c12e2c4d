"""Where actors run: Ray actor processes, or plain objects in the learner's process.

Both backends expose the same two calls, so the learner loop cannot tell them apart:
``submit(method, args_per_actor)`` starts `method` on every actor and returns a ticket, and
``gather(ticket)`` returns the actors' results in actor order. Ray runs the calls while the
learner trains; the local backend runs them inside `gather`. An actor's calls run in the order
submitted on both. A failure of any kind (an exception in an actor, an actor process that died,
no answer within ``timeout_s``) is raised as `ActorError` naming the actor.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any, Callable

from .actor import Actor


class ActorError(RuntimeError):
    """An actor failed, died, or did not answer in time."""


class LocalBackend:
    name = "local"

    def __init__(self, actor_kwargs: list[dict]) -> None:
        self.actors = []
        for i, kw in enumerate(actor_kwargs):
            try:
                self.actors.append(Actor(**kw))
            except Exception as e:
                raise ActorError(f"actor {i} could not start: {type(e).__name__}: {e}") from e

    def submit(self, method: str, args: list[tuple]) -> list[Callable[[], Any]]:
        return [lambda a=a, x=x: getattr(a, method)(*x) for a, x in zip(self.actors, args)]

    def gather(self, ticket: list[Callable[[], Any]]) -> list:
        results = []
        for i, call in enumerate(ticket):
            try:
                results.append(call())
            except Exception as e:
                raise ActorError(f"actor {i % len(self.actors)} failed: {type(e).__name__}: {e}") from e
        return results

    def put(self, payload: dict) -> dict:
        return payload

    def close(self) -> None:
        self.actors = []


class RayBackend:
    """Ray actors, one CPU each. Starts Ray (dashboard off, temp files in `temp_dir` or a short
    folder of its own that is removed at `close`) unless Ray is already running, in which case
    it uses that instance and leaves it running."""

    name = "ray"

    def __init__(self, actor_kwargs: list[dict], *, timeout_s: float, temp_dir: str | None = None) -> None:
        import ray

        self.ray, self.timeout_s = ray, timeout_s
        self._owns_ray = not ray.is_initialized()
        self._temp_dir = None
        if self._owns_ray:
            # Keep Ray's present behaviour (it sets no accelerator variables for CPU-only actors) without its warning.
            os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
            # Ray's socket paths must stay under ~100 characters, hence a short folder of our own.
            self._temp_dir = temp_dir or tempfile.mkdtemp(prefix="haet-ray-")
            ray.init(num_cpus=len(actor_kwargs), include_dashboard=False, _temp_dir=os.path.abspath(self._temp_dir),
                     logging_level="ERROR", log_to_driver=False, configure_logging=True,
                     runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}}
                     if os.environ.get("PYTHONPATH") else None)
        remote = ray.remote(num_cpus=1, max_restarts=0)(Actor)
        self.actors = [remote.remote(**{**kw, "one_thread": True}) for kw in actor_kwargs]
        self.gather(self.submit("ping", [()] * len(self.actors)))  # fail now, not mid-run, if an actor cannot start

    def submit(self, method: str, args: list[tuple]) -> list:
        return [getattr(a, method).remote(*x) for a, x in zip(self.actors, args)]

    def gather(self, ticket: list) -> list:
        ray = self.ray
        results = []
        for k, ref in enumerate(ticket):
            i = k % len(self.actors)  # a ticket may hold several calls per actor, in actor order
            try:
                results.append(ray.get(ref, timeout=self.timeout_s))
            except ray.exceptions.GetTimeoutError:
                raise ActorError(f"actor {i} did not answer within {self.timeout_s:g} s") from None
            except ray.exceptions.RayActorError as e:
                raise ActorError(f"actor {i} died: {_first_line(e)}") from None
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise ActorError(f"actor {i} failed: {type(cause).__name__}: {_first_line(cause)}") from None
        return results

    def put(self, payload: dict):
        return self.ray.put(payload)  # one copy in the object store serves every actor

    def close(self) -> None:
        for a in self.actors:
            try:
                self.ray.kill(a)
            except Exception:  # already dead: nothing to release
                pass
        self.actors = []
        if self._owns_ray:
            self.ray.shutdown()
            if self._temp_dir:
                shutil.rmtree(self._temp_dir, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
