"""Message content: Jinja2's sandbox with strict undefined, checked before anything is sent.

A template may only read profile fields, the person's tags as ``tags.NAME`` (or
``tags['NAME']``: the tag catalogue's names, a value as text or None when the person has
none), the campaign's offer and ``recommended`` (the customer's next-best products from
``predict.recommend``, each with the fields in ``predict.recommend.FIELDS``); an unknown name
or tag is a validation error (not a blank in a customer's message), and the sandbox stops
templates from reaching Python internals.

Personalised content: a person who refused personalisation (``activate.policy``) may still
get marketing they consented to, but never content drawn from their profile. Their render
context is *depersonalised* — every profile field outside ``NOT_PERSONAL`` (how we address
them and their membership account) is None, every tag None and ``recommended`` empty — so nothing
personal can reach their message whatever the template says. A template that would then
print a blank (a personal field used outside ``x or 'default'``, ``x|default(..)``, an
``if`` test or a ``for`` over ``recommended``) needs the campaign's ``fallback_template``:
validation says so.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateSyntaxError, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from closedloop.core.definitions import CampaignDef
from closedloop.core.errors import Problem
from closedloop.portrait.tables import PROFILES
from closedloop.predict.recommend import FIELDS as RECOMMENDED_FIELDS

ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
RECOMMENDED = "recommended"
TAGS = "tags"
ALLOWED = set(PROFILES.columns) | {"offer", "campaign", RECOMMENDED, TAGS}
NOT_PERSONAL = frozenset(
    {"customer_id", "name", "email", "phone", "member_id", "timezone", "tier", "points"}
)
"""Profile fields that address the person or state their account, not profile them."""
PERSONAL = frozenset((set(PROFILES.columns) | {RECOMMENDED, TAGS}) - NOT_PERSONAL)


@dataclass(frozen=True)
class Uses:
    """What one template reads: all names, personal ones printed bare, bad product fields."""

    names: frozenset[str]
    bare_personal: frozenset[str]  # would print a blank for a person who refused personalisation
    bad_item_fields: frozenset[str]
    tags: frozenset[str] = frozenset()  # tag names read as tags.NAME or tags['NAME']
    dynamic_tags: bool = False  # tags[...] with a computed name: cannot be checked


@lru_cache(maxsize=256)
def uses(text: str) -> Uses:
    """Analyse a template (raises ``TemplateSyntaxError``); once per text, as a run asks often."""
    ast = ENV.parse(text)
    names = frozenset(meta.find_undeclared_variables(ast))
    loop_vars: set[str] = set()
    for f in ast.find_all(nodes.For):
        if isinstance(f.iter, nodes.Name) and f.iter.name == RECOMMENDED:
            found = [f.target, *f.target.find_all(nodes.Name)]  # a name, or a tuple of them
            loop_vars |= {n.name for n in found if isinstance(n, nodes.Name)}
    bad: set[str] = set()
    for g in ast.find_all(nodes.Getattr):
        if _is_item(g.node, loop_vars) and g.attr not in RECOMMENDED_FIELDS:
            bad.add(g.attr)
    for gi in ast.find_all(nodes.Getitem):
        key = gi.arg.value if isinstance(gi.arg, nodes.Const) else None
        if _is_item(gi.node, loop_vars) and isinstance(key, str) and key not in RECOMMENDED_FIELDS:
            bad.add(key)
    tags: set[str] = set()
    dynamic = False
    for g in ast.find_all(nodes.Getattr):
        if isinstance(g.node, nodes.Name) and g.node.name == TAGS:
            tags.add(g.attr)
    for gi in ast.find_all(nodes.Getitem):
        if isinstance(gi.node, nodes.Name) and gi.node.name == TAGS:
            if isinstance(gi.arg, nodes.Const) and isinstance(gi.arg.value, str):
                tags.add(gi.arg.value)
            else:
                dynamic = True
    bare: set[str] = set()
    _bare(ast, None, bare)
    return Uses(names, frozenset(bare & PERSONAL & names), frozenset(bad), frozenset(tags), dynamic)


def _is_item(node: nodes.Node, loop_vars: set[str]) -> bool:
    """``r`` of ``for r in recommended``, or ``recommended[i]``."""
    if isinstance(node, nodes.Name):
        return node.name in loop_vars
    return (
        isinstance(node, nodes.Getitem)
        and isinstance(node.node, nodes.Name)
        and node.node.name == RECOMMENDED
    )


def _bare(
    node: nodes.Node, guard: bool | None, out: set[str], tested: frozenset[str] = frozenset()
) -> None:
    """Collect names read where a None (or an empty list) would print as a blank.

    ``tested``: names an enclosing ``if`` has tested true (its body never sees them empty).
    """
    if isinstance(node, nodes.Name):
        if node.ctx == "load" and not guard and node.name not in tested:
            out.add(node.name)
        return
    inner = tested
    if isinstance(node, nodes.If):
        inner = tested | {
            n.name
            for n in [node.test, *node.test.find_all(nodes.Name)]
            if isinstance(n, nodes.Name)
        }
    for field_name, child in node.iter_fields():
        kids = child if isinstance(child, list) else [child]
        for kid in kids:
            if not isinstance(kid, nodes.Node):
                continue
            if isinstance(node, nodes.If | nodes.CondExpr) and field_name == "test":
                continue  # a test is never printed, however deep the name sits in it
            guarded = (
                (isinstance(node, nodes.Or) and field_name == "left")
                or (isinstance(node, nodes.If | nodes.CondExpr) and field_name == "test")
                or (isinstance(node, nodes.For) and field_name == "iter")
                or (
                    isinstance(node, nodes.Filter)
                    and node.name == "default"
                    and field_name == "node"
                )
                or (isinstance(node, nodes.Test) and field_name == "node")
            )
            scope = inner if field_name == "body" else tested
            _bare(kid, guarded or (guard and isinstance(kid, nodes.Name)), out, scope)


def depersonalise(ctx: dict[str, Any]) -> dict[str, Any]:
    """The render context of a person who refused personalisation (see the module doc)."""
    out = {k: (None if k in PERSONAL else v) for k, v in ctx.items()}
    if RECOMMENDED in ctx:
        out[RECOMMENDED] = []
    if TAGS in ctx:
        out[TAGS] = dict.fromkeys(ctx[TAGS])
    return out


def check_templates(
    campaign: CampaignDef, tag_names: Collection[str] | None = None
) -> list[Problem]:
    """Every version of the message (the campaign's, each variant's and the fallback's subject
    and template): valid syntax, only known fields (and product fields of ``recommended``), an
    offer only if the campaign has one, no personal field at all in the fallback, and a
    fallback wherever a person who refused personalisation would otherwise get a blank — so
    a missing field is a validation error, not a blank in a customer's message.

    ``tag_names``: the project's tag catalogue; with it, every ``tags.NAME`` must name one.
    """
    versions = [("", "", campaign.subject, campaign.template)]
    versions += [
        (f"variant {v.name!r}: ", f"variants.{i}.", v.subject, v.template)
        for i, v in enumerate(campaign.variants)
    ]
    fallback = campaign.fallback_template is not None
    if fallback:
        versions.append(
            ("fallback: ", "fallback_", campaign.fallback_subject, campaign.fallback_template or "")
        )
    where = f"campaigns/{campaign.name}.yaml"
    problems: list[Problem] = []
    for label, prefix, subject, template in versions:
        for key, text in (("subject", subject), ("template", template)):
            place = prefix + key
            try:
                used = uses(text)
            except TemplateSyntaxError as e:
                msg = f"{label}template error: {e.message} (template line {e.lineno})"
                problems.append(Problem(where, msg, key=place))
                continue
            for name in sorted(used.names - ALLOWED):
                problems.append(
                    Problem(where, f"{label}unknown field {name!r} in {key}", key=place)
                )
            for name in sorted(used.bad_item_fields):
                known = ", ".join(RECOMMENDED_FIELDS)
                msg = f"{label}unknown product field {name!r} of `recommended` in {key} ({known})"
                problems.append(Problem(where, msg, key=place))
            if used.dynamic_tags:
                msg = f"{label}{key} reads tags[...] with a computed name: write tags.NAME"
                problems.append(Problem(where, msg, key=place))
            if tag_names is not None:
                for name in sorted(used.tags - set(tag_names)):
                    known = ", ".join(sorted(tag_names)) or "none"
                    msg = f"{label}unknown tag {name!r} in {key} (tags in the catalogue: {known})"
                    problems.append(Problem(where, msg, key=place))
            if "offer" in used.names and campaign.offer is None:
                msg = f"{label}{key} uses `offer` but the campaign has none"
                problems.append(Problem(where, msg, key=place))
            personal = sorted(used.names & PERSONAL)
            if prefix == "fallback_" and personal:
                msg = (
                    f"the fallback (for people who refused personalisation) must not read "
                    f"profile data: {', '.join(personal)} in {key}"
                )
                problems.append(Problem(where, msg, key=place))
            elif prefix != "fallback_" and used.bare_personal and not fallback:
                names = ", ".join(sorted(used.bare_personal))
                msg = (
                    f"{label}{key} prints {names}, which a person who refused personalisation "
                    f"must not get: declare `fallback_template` (a non-personalised version), "
                    f"or write e.g. `{{{{ {sorted(used.bare_personal)[0]} or '...' }}}}`"
                )
                problems.append(Problem(where, msg, key=place))
    return problems


@lru_cache(maxsize=256)
def compiled(text: str) -> Template:
    """Compile a template once per run, not once per person."""
    return ENV.from_string(text)


def personalised(campaign: CampaignDef) -> bool:
    """Whether any version of the message reads personal profile data or recommendations."""
    from closedloop.activate.assignment import message_texts

    return any(
        uses(text).names & PERSONAL
        for _, subject, template in message_texts(campaign)
        for text in (subject, template)
    )


def render(text: str, profile: dict[str, Any], campaign: CampaignDef) -> str:
    offer = campaign.offer.model_dump() if campaign.offer else None
    return compiled(text).render(**profile, offer=offer, campaign=campaign.name)


def renderer(text: str) -> Callable[[dict[str, Any]], str]:
    """A render function for one template, for sending to many people in one run.

    It skips what ``Template.render`` redoes per call (copying the context, rewriting
    tracebacks), about 3x faster per person; errors still raise (strict undefined), and a
    campaign's templates are checked before anything is sent.
    """
    t = compiled(text)
    base = dict(t.globals)
    root, new_context = t.root_render_func, t.new_context

    def render_one(values: dict[str, Any]) -> str:
        v = base.copy()
        v.update(values)
        return "".join(root(new_context(v, shared=True)))

    return render_one
