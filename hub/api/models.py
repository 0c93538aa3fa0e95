"""Models: create, list, get, and move aliases (``stable`` or custom; ``latest`` is computed)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status
from sqlmodel import Session, col, select

from hub import registry
from hub.api.deps import ModelNamePath, Operator, Viewer
from hub.api.schemas import ID_PATTERN, AliasSet, ModelCreate, ModelPublic
from hub.db import SessionDep
from hub.models import Model

router = APIRouter(tags=["models"])

AliasPath = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]


def model_public(session: Session, model: Model) -> ModelPublic:
    """Return the API form of a model."""
    return ModelPublic(
        name=model.name,
        task=model.task,
        description=model.description,
        created_at=model.created_at,
        versions=[v.version for v in registry.list_versions(session, model)],
        aliases=registry.aliases(session, model),
    )


@router.post("/models", status_code=status.HTTP_201_CREATED)
def create_model(body: ModelCreate, session: SessionDep, caller: Operator) -> ModelPublic:
    """Register a model name; versions are uploaded to it later."""
    model = registry.create_model(session, body.name, task=body.task, description=body.description, actor=caller.actor)
    return model_public(session, model)


@router.get("/models")
def list_models(session: SessionDep, _caller: Viewer) -> list[ModelPublic]:
    """List every model with its versions and aliases."""
    return [model_public(session, m) for m in session.exec(select(Model).order_by(col(Model.name)))]


@router.get("/models/{name}")
def get_model(name: ModelNamePath, session: SessionDep, _caller: Viewer) -> ModelPublic:
    """Return one model."""
    return model_public(session, registry.get_model(session, name))


@router.put("/models/{name}/aliases/{alias}")
def set_alias(
    name: ModelNamePath, alias: AliasPath, body: AliasSet, session: SessionDep, caller: Operator
) -> ModelPublic:
    """Point an alias at a version."""
    registry.set_alias(session, name, alias, body.version, actor=caller.actor)
    return model_public(session, registry.get_model(session, name))


@router.delete("/models/{name}/aliases/{alias}")
def remove_alias(name: ModelNamePath, alias: AliasPath, session: SessionDep, caller: Operator) -> ModelPublic:
    """Delete an alias."""
    registry.remove_alias(session, name, alias, actor=caller.actor)
    return model_public(session, registry.get_model(session, name))
