"""The HTTP API: an app factory in the style of Flask's own Celery example."""

from __future__ import annotations

from flask import Flask

from modelpress.cleanup import remove_host_leftovers
from modelpress.config import Settings
from modelpress.jobs import JobStore, connect
from modelpress.logs import configure_logging
from modelpress.objectstore import open_object_store
from modelpress.storage import Storage


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API from settings (environment variables when none are given). Nothing runs at import."""
    from service import artifacts_api, health, jobs_api
    from service.auth import auth_init_app
    from service.console import console_init_app
    from service.openapi import ProblemApi
    from service.queue import celery_init_app
    from service.uploads import StreamingRequest

    settings = settings or Settings.from_env()
    app = Flask("modelpress")
    app.request_class = StreamingRequest
    app.config.update(
        MAX_CONTENT_LENGTH=settings.max_upload_mb << 20,
        API_TITLE="ModelPress",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL="/docs/assets/",  # served from the swagger-ui-bundle wheel: no CDN
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},  # no badge fetched from validator.swagger.io
        API_SPEC_OPTIONS={
            "info": {
                "description": "Model compression as a service: upload a TorchScript model and a spec, "
                "poll the job, download the compressed model. With API keys configured, "
                "every /v1 route needs 'Authorization: Bearer <key>'."
            },
            "components": {"securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
        },
    )
    app.config.from_prefixed_env()
    app.extensions["modelpress"] = settings
    storage = Storage(settings.data_dir)
    storage.ensure()
    app.extensions["modelpress_storage"] = storage
    app.extensions["modelpress_objects"] = objects = open_object_store(settings, storage)
    remove_host_leftovers(objects, settings.orphan_after_s)  # of API processes killed mid-request
    app.extensions["modelpress_jobs"] = JobStore(connect(settings.redis_url))
    celery_init_app(app, settings)
    auth_init_app(app, settings)

    api = ProblemApi(app)
    api.register_blueprint(jobs_api.blp)
    api.register_blueprint(artifacts_api.blp)
    api.register_blueprint(jobs_api.webhooks_blp)
    api.register_blueprint(health.blp)
    console_init_app(app, settings)
    configure_logging(settings.log_level, settings.log_format)
    return app
