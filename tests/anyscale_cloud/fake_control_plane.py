"""A local fake of the few Anyscale control-plane calls the real ``anyscale`` SDK makes.

No Anyscale account exists in CI, so the tests run the REAL SDK (``anyscale.job.submit``,
``status``, ``wait``, ``get_logs``, ``terminate``, ``anyscale.service.status``) with its network
layer pointed here (``ANYSCALE_HOST`` / ``ANYSCALE_CLI_TOKEN``: see ``conftest.py``). Every reply
is built from the SDK's own generated response models (``anyscale.client.openapi_client.models``
and ``anyscale.sdk.anyscale_client.models``), whose constructors refuse a missing required field,
and serialised with the SDK's own ``sanitize_for_serialization``: if the SDK's contract changes,
these replies stop parsing and the tests say so. Every request the SDK sends is recorded
(``FakeControlPlane.requests``) so tests can assert on what the SDK sent.

The routes were learned from the SDK's source (``anyscale/_private/anyscale_client/
anyscale_client.py`` and the generated ``default_api.py`` files) and by running the SDK against
a server that refused everything; the recorded contract is in ``CONTRACT`` below.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyscale.client.openapi_client.models as internal_models
import anyscale.sdk.anyscale_client.models as external_models
from anyscale.client.openapi_client.api_client import ApiClient

# What the SDK (anyscale 0.26.112) sends for each public call, recorded against this fake ("ext" is
# the external API under ``<host>/ext/v0``, "api" the internal one under ``<host>/api/v2``). Every
# request carries the CLI token as a cookie, ``cli_token=<ANYSCALE_CLI_TOKEN>``, not a bearer header.
# tests/anyscale_cloud/test_jobs.py::test_what_the_sdk_sends checks the order of the submit.
CONTRACT = {
    "once per process (token check)": ["GET /api/v2/userinfo/"],
    "job.submit (image_uri, default cloud and compute config, local working_dir)": [
        "GET /ext/v0/clouds/default",
        "GET /ext/v0/cluster_computes/default?cloud_id=...",
        "GET /ext/v0/cluster_computes/{id}",
        "GET /ext/v0/projects/default_project?parent_cloud_id=...",
        "GET /api/v2/workos/deployment_infra",
        "POST /api/v2/builds/get_or_create_build_from_image_uri {image_uri}",
        "GET /ext/v0/cluster_computes/default?cloud_id=...",
        "GET /api/v2/compute_templates/{id}",
        "GET /ext/v0/clouds/{id}",
        "POST /api/v2/clouds/{id}/generate_cloud_data_bucket_presigned_url {file_type, file_name, access_mode}",
        "PUT <the presigned url> (the working_dir zip)",
        "POST /api/v2/decorated_ha_jobs/create {name, project_id, config: {entrypoint, runtime_env, build_id,"
        " compute_config_id, max_retries}}",
    ],
    "job.status (and each poll of job.wait)": [
        "GET /ext/v0/production_jobs/{id}",
        "POST /api/v2/decorated_ha_jobs/job_runs/search {ha_job_ids}",
        "status only: GET /api/v2/projects/{id}, /api/v2/compute_templates/{id},"
        " /ext/v0/cluster_environment_builds/{id}, /ext/v0/cluster_environments/{id}",
    ],
    "job.get_logs": [
        "GET /ext/v0/production_jobs/{id}",
        "GET /api/v2/logs/job_logs_download_v2/{job_run_id}?page_size=1000",
        "GET <each chunk_url> (Authorization: Bearer <bearer_token>)",
    ],
    "job.terminate": ["GET /ext/v0/production_jobs/{id}", "POST /ext/v0/production_jobs/{id}/terminate"],
    "service.status": [
        "GET /api/v2/services-v2/?name=...&archive_status=NOT_ARCHIVED&count=50",
        "per version: GET /ext/v0/cluster_environment_builds/{id}, /ext/v0/cluster_environments/{id},"
        " /api/v2/projects/{id}, /api/v2/compute_templates/{id}",
    ],
}

_SERIALIZER = ApiClient()
NOW = _dt.datetime(2026, 1, 1, tzinfo=_dt.timezone.utc)


_MODULES = {"api": internal_models, "ext": external_models}


def _model_class(name: str, api: str) -> Any:
    return getattr(_MODULES[api], name, None)


def _placeholder(type_name: str, api: str) -> Any:
    """A value for a required field the test does not care about, of the type the SDK declares."""
    if type_name == "str":
        return "placeholder"
    if type_name == "bool":
        return False
    if type_name in ("int", "float"):
        return 0
    if type_name in ("datetime", "date"):
        return NOW
    if type_name.startswith("list["):
        return []
    if type_name.startswith("dict("):
        return {}
    if type_name == "object":
        return {}
    cls = _model_class(type_name, api)
    if cls is not None and hasattr(cls, "allowable_values"):
        return cls.allowable_values[0]
    if cls is not None:
        return build(api, type_name)
    return None


_MISSING = re.compile(r"Invalid value for `(\w+)`, must not be `None`")


def build(api: str, model: str, /, **fields: Any) -> Any:
    """An instance of the SDK's model ``name`` of the ``api`` ("api": internal, "ext": external
    client); required fields the caller left out get placeholders.

    The SDK's constructors check required fields and enums (client-side validation), so a reply
    built here is one the SDK accepts, and a wrong field name is refused at once (TypeError).
    """
    cls = _model_class(model, api)
    if cls is None:
        raise KeyError(f"the anyscale SDK has no {api} model {model!r}")
    given = dict(fields)
    for _ in range(len(cls.openapi_types) + 1):
        try:
            return cls(**given)
        except ValueError as error:
            match = _MISSING.search(str(error))
            if not match or match.group(1) in given:
                raise
            given[match.group(1)] = _placeholder(cls.openapi_types[match.group(1)], api)
    raise AssertionError(f"could not build {model}")


def nested(api: str, parent: str, field_name: str, /, **fields: Any) -> Any:
    """A value of the type the SDK declares for ``parent.field_name`` (so a reply cannot put the
    wrong model where the SDK's deserialiser expects another)."""
    declared = _model_class(parent, api).openapi_types[field_name]
    return build(api, declared, **fields)


def wire(model: Any) -> Any:
    """The JSON the server sends for an SDK model (the SDK's own serialiser, attribute_map names)."""
    return _SERIALIZER.sanitize_for_serialization(model)


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any
    cookie_token: str | None


@dataclass
class FakeJob:
    id: str
    name: str
    config: dict[str, Any]
    states: list[str]  # HaJobStates still to go through, one per poll; the last one stays
    logs: str = ""
    terminated: bool = False
    polls: int = 0

    @property
    def state(self) -> str:
        return self.states[0]

    def advance(self) -> None:
        self.polls += 1
        if len(self.states) > 1:
            self.states.pop(0)


@dataclass
class FakeService:
    name: str
    query_url: str
    token: str
    primary_version: str = "v1"
    canary_version: str | None = None
    canary_weight: int = 0  # percent of traffic to the canary
    state: str = "RUNNING"
    id: str = ""


@dataclass
class FakeControlPlane:
    """The fake: ``start()``, point the SDK at ``url`` with ``token``, script jobs and services."""

    token: str = "aph0_fake_cli_token_for_tests"
    requests: list[Recorded] = field(default_factory=list)
    jobs: dict[str, FakeJob] = field(default_factory=dict)
    services: dict[str, FakeService] = field(default_factory=dict)
    uploads: dict[str, bytes] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # exceptions inside the fake's own routes
    # states a newly submitted job goes through (one per status poll); tests set it before submit
    next_job_states: list[str] = field(default_factory=lambda: ["PENDING", "RUNNING", "SUCCESS"])
    next_job_logs: str = "training...\ndone\n"
    url: str = ""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Any]]] = []
        self._add_routes()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> FakeControlPlane:
        plane = self

        class Handler(BaseHTTPRequestHandler):
            def _handle(self) -> None:
                plane._dispatch(self)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

            def log_message(self, *args: Any) -> None:  # quiet
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # -- scripting --------------------------------------------------------------------------
    def add_service(self, name: str, query_url: str, token: str, **kwargs: Any) -> FakeService:
        service = FakeService(
            name=name, query_url=query_url, token=token, id=f"service2_{len(self.services) + 1}", **kwargs
        )
        self.services[name] = service
        return service

    def calls(self, method: str | None = None, pattern: str = "") -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if (method is None or r.method == method) and re.search(pattern, r.path)]

    def uploaded_files(self) -> dict[str, bytes]:
        """The files of the last working_dir zip the SDK uploaded."""
        blob = list(self.uploads.values())[-1]
        with zipfile.ZipFile(BytesIO(blob)) as archive:
            return {name: archive.read(name) for name in archive.namelist() if not name.endswith("/")}

    # -- HTTP -------------------------------------------------------------------------------
    def _dispatch(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body: Any = raw
        if raw and "json" in (handler.headers.get("content-type") or ""):
            body = json.loads(raw)
        cookie = handler.headers.get("cookie") or ""
        match = re.search(r"cli_token=([^;]+)", cookie)
        record = Recorded(handler.command, parts.path, parse_qs(parts.query), body, match.group(1) if match else None)
        with self._lock:
            self.requests.append(record)
        status, payload = 404, {"error": {"detail": f"fake control plane: no route for {handler.command} {parts.path}"}}
        if parts.path.startswith("/upload/"):  # the presigned PUT of a working_dir zip
            status, payload = self._upload(parts.path, raw)
        elif parts.path.startswith("/chunks/"):  # a log chunk's presigned GET: plain text
            self._send_text(handler, self._log_chunk(parts.path.rsplit("/", 1)[-1]))
            return
        elif record.cookie_token != self.token:
            status, payload = 401, {"error": {"detail": "invalid cli token"}}
        else:
            for method, pattern, route in self._routes:
                found = pattern.fullmatch(parts.path)
                if method == handler.command and found:
                    try:
                        with self._lock:
                            status, payload = route(record, *found.groups())
                    except Exception as error:  # a bug in the fake: say so to the SDK and the test
                        self.errors.append(f"{handler.command} {parts.path}: {error!r}")
                        status, payload = 500, {"error": {"detail": f"fake control plane bug: {error!r}"}}
                    break
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("content-type", "application/json")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _route(self, method: str, pattern: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(function: Callable[..., Any]) -> Callable[..., Any]:
            self._routes.append((method, re.compile(pattern), function))
            return function

        return register

    def _log_chunk(self, run_id: str) -> str:
        with self._lock:
            job = self.jobs.get(run_id.removesuffix("_run"))
            return job.logs if job else ""

    @staticmethod
    def _send_text(handler: BaseHTTPRequestHandler, text: str) -> None:
        data = text.encode()
        handler.send_response(200)
        handler.send_header("content-type", "text/plain")
        handler.send_header("content-length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _upload(self, path: str, raw: bytes) -> tuple[int, Any]:
        with self._lock:
            self.uploads[path] = raw
        return 200, {}

    def _add_routes(self) -> None:
        route = self._route
        cloud_id, project_id, compute_id, build_id, env_id = "cld_1", "prj_1", "cpt_1", "bld_1", "apt_1"

        @route("GET", r"/api/v2/userinfo/?")
        def userinfo(record: Recorded) -> tuple[int, Any]:
            return reply("api", "UserinfoResponse", build("api", "UserInfo", id="usr_1", email="t@example.com"))

        def cloud() -> Any:
            return build(
                "ext", "Cloud", id=cloud_id, name="fake-cloud", provider="AWS", region="us-west-2", is_default=True
            )

        @route("GET", r"/ext/v0/clouds/default")
        def default_cloud(record: Recorded) -> tuple[int, Any]:
            return reply("ext", "CloudResponse", cloud())

        @route("GET", r"/ext/v0/clouds/([^/]+)")
        def get_cloud(record: Recorded, wanted: str) -> tuple[int, Any]:
            return reply("ext", "CloudResponse", cloud()) if wanted == cloud_id else not_found(wanted)

        @route("POST", r"/api/v2/clouds/find_by_name")
        def cloud_by_name(record: Recorded) -> tuple[int, Any]:
            return reply("api", "CloudResponse", build("api", "Cloud", id=cloud_id, name=record.body["name"]))

        def compute() -> Any:
            config = nested("ext", "ClusterCompute", "config", cloud_id=cloud_id)
            return build("ext", "ClusterCompute", id=compute_id, name="default-compute", config=config, anonymous=False)

        @route("GET", r"/ext/v0/cluster_computes/default")
        def default_compute(record: Recorded) -> tuple[int, Any]:
            return reply("ext", "ClustercomputeResponse", compute())

        @route("GET", r"/ext/v0/cluster_computes/([^/]+)")
        def get_compute(record: Recorded, wanted: str) -> tuple[int, Any]:
            return reply("ext", "ClustercomputeResponse", compute())

        @route("GET", r"/api/v2/compute_templates/([^/]+)")
        def compute_template(record: Recorded, wanted: str) -> tuple[int, Any]:
            config = nested("api", "DecoratedComputeTemplate", "config", cloud_id=cloud_id)
            return reply(
                "api",
                "DecoratedcomputetemplateResponse",
                build("api", "DecoratedComputeTemplate", id=wanted, name="default-compute", config=config),
            )

        @route("GET", r"/ext/v0/projects/default_project")
        def default_project(record: Recorded) -> tuple[int, Any]:
            return reply(
                "ext",
                "ProjectResponse",
                build("ext", "Project", id=project_id, name="default", parent_cloud_id=cloud_id),
            )

        @route("GET", r"/ext/v0/projects/([^/]+)")
        def get_project(record: Recorded, wanted: str) -> tuple[int, Any]:
            return reply(
                "ext", "ProjectResponse", build("ext", "Project", id=wanted, name="default", parent_cloud_id=cloud_id)
            )

        @route("GET", r"/api/v2/workos/deployment_infra")
        def deployment_infra(record: Recorded) -> tuple[int, Any]:
            return reply(
                "api",
                "DeploymentinfraresponseResponse",
                build("api", "DeploymentInfraResponse", deployment_infra="aws"),
            )

        @route("GET", r"/api/v2/projects/([^/]+)")
        def internal_project(record: Recorded, wanted: str) -> tuple[int, Any]:
            return reply(
                "api", "ProjectResponse", build("api", "Project", id=wanted, name="default", parent_cloud_id=cloud_id)
            )

        @route("POST", r"/api/v2/builds/get_or_create_build_from_image_uri")
        def image_build(record: Recorded) -> tuple[int, Any]:
            return reply(
                "api",
                "DecoratedbuildResponse",
                build(
                    "api",
                    "DecoratedBuild",
                    id=build_id,
                    application_template_id=env_id,
                    docker_image_name=record.body.get("image_uri"),
                    status="succeeded",
                    is_byod=True,
                ),
            )

        @route("GET", r"/ext/v0/cluster_environment_builds/default")
        def default_build(record: Recorded) -> tuple[int, Any]:
            return reply(
                "ext",
                "ClusterenvironmentbuildResponse",
                build("ext", "ClusterEnvironmentBuild", id=build_id, cluster_environment_id=env_id, status="succeeded"),
            )

        @route("GET", r"/ext/v0/cluster_environment_builds/([^/]+)")
        def get_build(record: Recorded, wanted: str) -> tuple[int, Any]:
            return reply(
                "ext",
                "ClusterenvironmentbuildResponse",
                build(
                    "ext",
                    "ClusterEnvironmentBuild",
                    id=wanted,
                    cluster_environment_id=env_id,
                    status="succeeded",
                    docker_image_name="anyscale/image:1",
                ),
            )

        @route("GET", r"/ext/v0/cluster_environments/([^/]+)")
        def get_env(record: Recorded, wanted: str) -> tuple[int, Any]:
            return reply(
                "ext", "ClusterenvironmentResponse", build("ext", "ClusterEnvironment", id=wanted, name="image")
            )

        @route("POST", r"/api/v2/clouds/([^/]+)/generate_cloud_data_bucket_presigned_url")
        def presign(record: Recorded, cloud: str) -> tuple[int, Any]:
            name = record.body["file_name"]
            info = build(
                "api",
                "CloudDataBucketPresignedUrlResponse",
                file_uri=f"s3://fake-bucket/{name}",
                url=f"{self.url}/upload/{name}",
                file_exists=False,
                url_scheme="HTTP",
            )
            return reply("api", "ClouddatabucketpresignedurlresponseResponse", info)

        @route("POST", r"/api/v2/decorated_ha_jobs/create")
        def create_job(record: Recorded) -> tuple[int, Any]:
            job = FakeJob(
                id=f"prodjob_{len(self.jobs) + 1}",
                name=record.body["name"],
                config=record.body["config"],
                states=list(self.next_job_states),
                logs=self.next_job_logs,
            )
            self.jobs[job.id] = job
            return reply("api", "InternalproductionjobResponse", self._job_model("api", "InternalProductionJob", job))

        @route("GET", r"/ext/v0/production_jobs/([^/]+)")
        def get_job(record: Recorded, wanted: str) -> tuple[int, Any]:
            job = self.jobs.get(wanted)
            if job is None:
                return not_found(wanted)
            model = self._job_model("ext", "ProductionJob", job)
            job.advance()  # one state per poll: the test scripts the sequence
            return reply("ext", "ProductionjobResponse", model)

        @route("POST", r"/ext/v0/production_jobs/([^/]+)/terminate")
        def terminate(record: Recorded, wanted: str) -> tuple[int, Any]:
            job = self.jobs.get(wanted)
            if job is None:
                return not_found(wanted)
            job.terminated = True
            job.states = ["TERMINATED"]
            return reply("ext", "ProductionjobResponse", self._job_model("ext", "ProductionJob", job))

        @route("POST", r"/api/v2/decorated_ha_jobs/job_runs/search")
        def job_runs(record: Recorded) -> tuple[int, Any]:
            runs = {}
            for job_id in record.body["ha_job_ids"]:
                job = self.jobs.get(job_id)
                runs[job_id] = (
                    [build("api", "JobRunSummary", id=f"{job_id}_run", name="run-1", status="RUNNING")] if job else []
                )
            return 200, wire(build("api", "SearchJobRunsResponse", results=runs))

        @route("GET", r"/api/v2/logs/job_logs_download_v2/([^/]+)")
        def logs(record: Recorded, run_id: str) -> tuple[int, Any]:
            chunk = build("api", "LogFileChunk", chunk_url=f"{self.url}/chunks/{run_id}", size=0)
            return reply(
                "api",
                "LogdownloadresultResponse",
                build("api", "LogDownloadResult", log_chunks=[chunk], bearer_token="log-bearer"),
            )

        @route("GET", r"/api/v2/services-v2/?")
        def list_services(record: Recorded) -> tuple[int, Any]:
            wanted = (record.query.get("name") or [None])[0]
            found = [self._service_model(s) for s in self.services.values() if wanted in (None, s.name)]
            metadata = build("api", "ListResponseMetadata", total=len(found))
            return 200, wire(build("api", "DecoratedlistserviceapimodelListResponse", results=found, metadata=metadata))

    def _service_model(self, service: FakeService) -> Any:
        def version(label: str, name: str, weight: int) -> Any:
            return build(
                "api",
                "DecoratedProductionServiceV2VersionAPIModel",
                id=f"{service.id}_{label}_{name}",
                version=name,
                weight=weight,
                current_weight=weight,
                created_at=NOW,
                current_state="RUNNING",
                build_id="bld_1",
                compute_config_id="cpt_1",
                ray_serve_config={"applications": [{"name": "llm", "import_path": "ray.serve.llm:build_openai_app"}]},
            )

        canary = service.canary_version
        primary_weight = 100 - service.canary_weight if canary else 100
        return build(
            "api",
            "DecoratedListServiceAPIModel",
            id=service.id,
            name=service.name,
            project_id="prj_1",
            cloud_id="cld_1",
            creator_id="usr_1",
            created_at=NOW,
            current_state=service.state,
            goal_state="RUNNING",
            auth_token=service.token or None,
            base_url=service.query_url,
            hostname=service.query_url.split("://")[-1],
            is_multi_version=False,
            primary_version=version("primary", service.primary_version, primary_weight),
            canary_version=version("canary", canary, service.canary_weight) if canary else None,
        )

    def _job_model(self, api: str, name: str, job: FakeJob) -> Any:
        state = nested(api, name, "state", id="st_1", current_state=job.state, state_transitioned_at=NOW)
        config = wire(job.config)
        job_config = nested(
            api,
            name,
            "config",
            entrypoint=config.get("entrypoint"),
            build_id=config.get("build_id"),
            compute_config_id=config.get("compute_config_id"),
            runtime_env=config.get("runtime_env"),
            max_retries=config.get("max_retries"),
        )
        return build(
            api,
            name,
            id=job.id,
            name=job.name,
            project_id="prj_1",
            config=job_config,
            state=state,
            last_job_run_id=f"{job.id}_run",
            created_at=NOW,
            creator_id="usr_1",
        )


def reply(api: str, wrapper: str, inner: Any) -> tuple[int, Any]:
    """200 with ``{"result": ...}``, the SDK's response wrapper model around ``inner``."""
    return 200, wire(build(api, wrapper, result=inner))


def not_found(what: str) -> tuple[int, Any]:
    return 404, {"error": {"detail": f"{what} not found"}}


__all__ = ["CONTRACT", "FakeControlPlane", "FakeJob", "FakeService", "build", "nested", "wire"]
