"""Rule tags: the first rule whose condition holds on the profile gives the tag's value.

Conditions are the shared condition language (``core.conditions``) compiled to Ibis, so a tag
is one ``CASE`` expression over ``profiles`` on any engine. The expression lives in
``tags.values`` with the other tag types; this module keeps the names earlier code imports.
"""

from __future__ import annotations

from closedloop.portrait import tables as _portrait_tables
from closedloop.tags.build import build_tags
from closedloop.tags.check import check_tag
from closedloop.tags.values import rule_value_expr as tag_value_expr

PROFILE_COLUMNS = set(_portrait_tables.PROFILES.columns)

__all__ = ["PROFILE_COLUMNS", "build_tags", "check_tag", "tag_value_expr"]
