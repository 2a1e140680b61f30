"""The read-only HTTP API: profiles, segments, tags, campaign reports and validation.

A composition layer like ``cli``: every route calls the same functions as the command it
mirrors (``closedloop profile``, ``segment size|preview``, ``tags list``, ``report
campaign``, ``validate``), so
the API and the CLI can never disagree. The warehouse is opened read-only per request
(``api.warehouse``): while a writer holds it the answer is 503 with Retry-After, never 500 —
except a customer's profile, answered from the serving store the last build wrote, saying so.
Profiles are personal data, so every route wants the bearer token ``create_api`` is given
(``CLOSEDLOOP_API_TOKEN`` by default); without a token the API is open and
``closedloop api`` serves it on loopback only.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict

from closedloop.api.warehouse import WarehouseBusy, read_only, serving_profile
from closedloop.core.clock import Clock
from closedloop.core.definitions import Project, load_project
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError, DefinitionError, Problem

TOKEN_ENV = "CLOSEDLOOP_API_TOKEN"  # noqa: S105 - the variable's name, not a secret
RETRY_AFTER_S = 5
MAX_SAMPLE = 1000
BEARER = HTTPBearer(auto_error=False)  # module level: route annotations are resolved here


class Matched(BaseModel):
    type: str
    value: str


class ProfileOut(BaseModel):
    """A customer (``customer_id``, ``source``, ``profile``, ``accounts``) or an account
    (``account_id``, ``account``, ``contacts``, ``segments``), as ``closedloop profile --json``."""

    model_config = ConfigDict(extra="allow")
    kind: Literal["customer", "account"]
    matched: Matched


class SegmentSummary(BaseModel):
    name: str
    kind: Literal["customers", "accounts"]
    size: int


class SegmentDetail(SegmentSummary):
    by: dict[str, int]  # customers by lifecycle stage, accounts by industry
    sample: list[dict[str, Any]]  # members with the fields that qualified them


class TagOut(BaseModel):
    """One tag of the catalogue, as ``closedloop tags list --json``."""

    model_config = ConfigDict(extra="allow")
    name: str
    type: str
    owner: str | None
    coverage: float
    computed_at: str | None
    last_used_at: str | None


class LiftOut(BaseModel):
    """Conversion-rate lift of treatment over control: absolute (Newcombe's 95% interval)
    and relative, with the two-sided p-value."""

    treated_n: int
    treated_x: int
    control_n: int
    control_x: int
    absolute: float
    absolute_low: float
    absolute_high: float
    relative: float | None
    relative_low: float | None
    relative_high: float | None
    p_value: float


class MeanDifferenceOut(BaseModel):
    """Revenue per person of a variant minus the holdout's, with Welch's 95% interval."""

    treated_mean: float
    control_mean: float
    difference: float
    low: float
    high: float
    p_value: float


class ArmOut(BaseModel):
    """One arm (the holdout, or a variant), intent-to-treat: everyone assigned to it."""

    name: str
    assigned: int
    reached: int  # messaged
    stopped: int  # stopped by a timing rule of the contact policy (or would have been)
    conversions: int
    rate: float
    revenue: float
    revenue_per_person: float


class VariantOut(ArmOut):
    """A variant's counts and its effect over the holdout."""

    lift: LiftOut | None  # conversion rate vs the holdout
    revenue_difference: MeanDifferenceOut | None  # revenue per person vs the holdout


class SampleRatioOut(BaseModel):
    """Chi-square check of the split across all arms (holdout first) against the design;
    ``flagged`` when p < 0.001."""

    arms: list[str]
    observed: list[int]
    expected_shares: list[float]
    p_value: float | None
    flagged: bool
    line: str


class ComparisonOut(BaseModel):
    better: str
    worse: str
    lift: LiftOut
    p_adjusted: float  # Holm-Bonferroni over all pairs of variants
    significant: bool
    text: str


class WinnerOut(BaseModel):
    """The A/B verdict: ``name`` only when the best variant significantly beats every other
    (Holm-adjusted) and the holdout; else null, and ``reason`` says which comparison failed."""

    name: str | None
    reason: str
    line: str
    method: str
    comparisons: list[ComparisonOut]
    vs_holdout: LiftOut | None


class CampaignReport(BaseModel):
    """One occasion of a campaign, as ``closedloop report campaign`` measures it: treatment
    and holdout (intent-to-treat), reach, conversions, revenue, rates, lift and the SRM check;
    per variant and holdout, the sample-ratio check across arms and the A/B verdict."""

    campaign: str
    occasion: str
    estimand: str
    treated: int
    held_out: int
    reached: int | None
    treated_stopped: int
    held_out_stopped: int
    treated_conversions: int
    held_out_conversions: int
    treated_rate: float | None
    held_out_rate: float | None
    treated_revenue: float
    held_out_revenue: float
    lift: LiftOut
    sample_ratio_p: float
    as_sent: LiftOut | None
    held_out_capped: int
    as_sent_symmetric: LiftOut | None
    rows: list[tuple[str, str]]  # the report's rows, as the CLI prints them
    has_variants: bool  # False: ``variants`` is the one treatment arm
    holdout: ArmOut
    variants: list[VariantOut]
    sample_ratio: SampleRatioOut
    winner: WinnerOut
    variant_header: list[str]  # the per-variant table, as the CLI prints it
    variant_rows: list[list[str]]


class ProblemOut(BaseModel):
    file: str
    line: int | None
    key: str | None
    message: str


class ValidationOut(BaseModel):
    ok: bool
    problems: list[ProblemOut]


class ErrorOut(BaseModel):
    detail: str


def as_cli_json(value: Any) -> Any:
    """``value`` encoded exactly as the CLI's ``--json`` encodes it (dates as ``str()``), so
    the API and the CLI answer with equal documents."""
    return json.loads(json.dumps(value, default=str, ensure_ascii=False))


def _problems(problems: list[Problem]) -> list[ProblemOut]:
    return [ProblemOut(file=p.file, line=p.line, key=p.key, message=p.message) for p in problems]


def segment_size(
    engine: Engine, project: Project, name: str, as_of: datetime | None = None
) -> tuple[int, dict[str, int]]:
    """Members now, and their split (lifecycle stage, or industry for accounts), as
    ``closedloop segment size`` counts them."""
    from closedloop.pipeline import project_fields
    from closedloop.segments.audience import preview_expr

    seg = project.segments[name]
    expr = preview_expr(engine, seg, project_fields(project), Clock(as_of).now())
    if seg.of == "accounts":
        a = engine.table("accounts").select("account_id", "industry")
        j = expr.select("account_id").join(a, "account_id")
        key = "industry"
    else:
        p = engine.table("profiles").select("customer_id", "lifecycle_stage")
        j = expr.select("customer_id").join(p, "customer_id")
        key = "lifecycle_stage"
    rows = j.group_by(key).aggregate(n=j.count()).to_pyarrow().to_pylist()
    by = {str(r[key]) if r[key] is not None else "(unknown)": int(r["n"]) for r in rows}
    return sum(by.values()), by


def segment_sample(
    engine: Engine, project: Project, name: str, n: int, as_of: datetime | None = None
) -> list[dict[str, Any]]:
    """``n`` members with the fields that qualified them (``segment preview``), by id."""
    from closedloop.pipeline import project_fields
    from closedloop.segments.audience import preview_expr

    seg = project.segments[name]
    expr = preview_expr(engine, seg, project_fields(project), Clock(as_of).now())
    key = "account_id" if seg.of == "accounts" else "customer_id"
    rows: list[dict[str, Any]] = expr.order_by(key).limit(n).to_pyarrow().to_pylist()
    return rows


def occasions(engine: Engine, campaign: str) -> list[str]:
    """The occasions a campaign was decided for, the latest decided first."""
    d = engine.table("deliveries")
    d = d.filter(d.campaign == campaign)
    rows = d.group_by("occasion").aggregate(at=d.decided_at.max()).to_pyarrow().to_pylist()
    return [str(r["occasion"]) for r in sorted(rows, key=lambda r: r["at"], reverse=True)]


def campaign_report(
    engine: Engine, project: Project, name: str, occasion: str, as_of: datetime | None = None
) -> CampaignReport:
    """``measure_campaign`` (what ``closedloop report campaign`` prints) as one document."""
    from dataclasses import asdict

    from closedloop.measure.campaign import measure_campaign
    from closedloop.measure.report import campaign_rows
    from closedloop.measure.variants import Arm, measure_variants, variant_table

    campaign = project.campaigns[name]
    o = measure_campaign(engine, campaign, occasion, Clock(as_of))
    v = measure_variants(engine, campaign, occasion)
    doc = asdict(o)
    doc["treated_rate"] = o.treated_conversions / o.treated if o.treated else None
    doc["held_out_rate"] = o.held_out_conversions / o.held_out if o.held_out else None
    doc["rows"] = campaign_rows(o)

    def arm(a: Arm) -> dict[str, Any]:
        out = asdict(a)
        del out["revenue_sumsq"]
        return out | {"rate": a.rate, "revenue_per_person": a.revenue_per_person}

    srm = v.sample_ratio
    w = v.winner
    header, rows = variant_table(v)
    doc |= {
        "has_variants": v.has_variants,
        "holdout": arm(v.holdout),
        "variants": [
            arm(r.arm)
            | {
                "lift": None if r.lift is None else asdict(r.lift),
                "revenue_difference": None if r.revenue is None else asdict(r.revenue),
            }
            for r in v.variants
        ],
        "sample_ratio": asdict(srm) | {"flagged": srm.flagged, "line": srm.line()},
        "winner": {
            "name": w.name,
            "reason": w.reason,
            "line": w.line(),
            "method": w.method,
            "comparisons": [asdict(c) | {"text": c.text()} for c in w.comparisons],
            "vs_holdout": None if w.vs_holdout is None else asdict(w.vs_holdout),
        },
        "variant_header": header,
        "variant_rows": rows,
    }
    return CampaignReport.model_validate(doc)


def validate_project(root: Path | str) -> list[Problem]:
    """Every problem of the project on disk, as ``closedloop validate`` finds them."""
    from closedloop.activate.journeys import check_journeys
    from closedloop.pipeline import check_project

    try:
        p = load_project(root)
    except DefinitionError as e:
        return list(e.problems)
    except ClosedloopError as e:
        return [Problem(file=str(root), message=str(e))]
    return check_project(p) + check_journeys(p)


def create_api(project: Project, token: str | None = None) -> FastAPI:
    """The API over ``project``; ``token`` (default: ``$CLOSEDLOOP_API_TOKEN``) guards it."""
    import closedloop.segments.accounts  # noqa: F401  (declares the account tables)
    from closedloop.cli.profile_cmds import profile_document
    from closedloop.tags.catalogue import catalogue

    secret = token if token is not None else os.environ.get(TOKEN_ENV) or None

    def auth(
        cred: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
    ) -> None:
        if secret is None:
            return
        given = cred.credentials if cred is not None else ""
        if not secrets.compare_digest(given.encode(), secret.encode()):
            raise HTTPException(
                401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
            )

    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorOut},
        503: {"model": ErrorOut, "description": "the warehouse is held by a writer"},
    }
    app = FastAPI(
        title="closedloop API",
        version="1",
        description="Read-only: profiles, segments, tags, campaign reports and validation of one project.",
        dependencies=[Depends(auth)],
        responses=errors,
    )

    @app.exception_handler(WarehouseBusy)
    def busy(_: Request, e: WarehouseBusy) -> JSONResponse:
        return JSONResponse(
            {"detail": f"{e}; retry later"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )

    def unknown_segment(name: str) -> HTTPException:
        known = ", ".join(sorted(project.segments)) or "none"
        return HTTPException(404, f"no segment {name!r}; known: {known}")

    @app.get("/v1/profiles/{identifier}", response_model=ProfileOut, tags=["profiles"])
    def get_profile(
        identifier: str,
        type: Annotated[str | None, Query(description="identifier type, or `account`")] = None,
    ) -> Any:
        """The 360° profile of the customer (or account) ``identifier`` names.

        While a writer holds the warehouse, a customer is answered from the profile serving
        store the last build wrote (``source: serving`` and ``served_from`` say so and when;
        accounts left out); an account, or a store that cannot be read, is 503."""
        served_from = None
        try:
            try:
                with read_only(project.engine_url) as engine:
                    doc = profile_document(engine, project.identity, identifier, type)
            except WarehouseBusy as busy:
                if type == "account":
                    raise
                doc, written_at = serving_profile(
                    project.engine_url, project.identity, identifier, type, busy
                )
                served_from = f" (as of the serving store written at {written_at})"
        except ClosedloopError as e:
            raise HTTPException(400, str(e)) from None
        if doc is None:
            what = {None: "customer or account", "account": "account"}.get(type, "customer")
            detail = f"no {what} has the identifier {identifier!r}"
            raise HTTPException(404, detail + (served_from or ""))
        return as_cli_json(doc)

    @app.get("/v1/segments", response_model=list[SegmentSummary], tags=["segments"])
    def list_segments(as_of: datetime | None = None) -> list[SegmentSummary]:
        """Every segment with its kind and its size now (or ``as_of``)."""
        out = []
        with read_only(project.engine_url) as engine:
            for name in sorted(project.segments):
                n, _ = segment_size(engine, project, name, as_of)
                kind = project.segments[name].of
                out.append(SegmentSummary(name=name, kind=kind, size=n))
        return out

    @app.get("/v1/segments/{name}", response_model=SegmentDetail, tags=["segments"])
    def get_segment(
        name: str,
        sample: Annotated[int, Query(ge=0, le=MAX_SAMPLE)] = 10,
        as_of: datetime | None = None,
    ) -> SegmentDetail:
        """A segment's size, its split, and a sample of members with the fields that qualified
        them."""
        if name not in project.segments:
            raise unknown_segment(name)
        with read_only(project.engine_url) as engine:
            n, by = segment_size(engine, project, name, as_of)
            rows = segment_sample(engine, project, name, sample, as_of) if sample else []
        return SegmentDetail(
            name=name,
            kind=project.segments[name].of,
            size=n,
            by=by,
            sample=as_cli_json(rows),
        )

    @app.get("/v1/tags", response_model=list[TagOut], tags=["tags"])
    def list_tags() -> list[dict[str, Any]]:
        """The tag catalogue: type, owner, coverage, freshness, last use and flags."""
        try:
            with read_only(project.engine_url) as engine:
                infos = catalogue(engine, project)
        except ClosedloopError as e:
            raise HTTPException(400, str(e)) from None
        return [as_cli_json(i.as_json()) for i in infos]

    @app.get("/v1/campaigns/{name}/report", response_model=CampaignReport, tags=["campaigns"])
    def get_campaign_report(
        name: str,
        occasion: Annotated[
            str | None, Query(description="default: the occasion decided last")
        ] = None,
        as_of: datetime | None = None,
    ) -> CampaignReport:
        """Treatment and holdout of one occasion: reach, conversions, rates, lift with its 95%
        interval and p-value, and the sample-ratio check; per variant and holdout the same,
        the split checked across all arms, and the A/B winner only when significant."""
        if name not in project.campaigns:
            known = ", ".join(sorted(project.campaigns)) or "none"
            raise HTTPException(404, f"no campaign {name!r}; known: {known}")
        with read_only(project.engine_url) as engine:
            known_occasions = occasions(engine, name)
            if not known_occasions:
                raise HTTPException(404, f"campaign {name!r} has not run yet: nothing to measure")
            if occasion is None:
                occasion = known_occasions[0]
            elif occasion not in known_occasions:
                raise HTTPException(
                    404,
                    f"campaign {name!r} has no occasion {occasion!r}; "
                    f"known: {', '.join(known_occasions)}",
                )
            try:
                return campaign_report(engine, project, name, occasion, as_of)
            except (ClosedloopError, ValueError) as e:
                raise HTTPException(400, f"cannot measure {name} / {occasion}: {e}") from None

    @app.post("/v1/validate", response_model=ValidationOut, tags=["project"])
    def validate() -> ValidationOut:
        """Validate the project's definitions as they are on disk now."""
        problems = validate_project(project.root)
        return ValidationOut(ok=not problems, problems=_problems(problems))

    return app
