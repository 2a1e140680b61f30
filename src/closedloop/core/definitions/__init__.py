"""A user's project ("CDP as code"): YAML definitions loaded into pydantic models.

Layout of a project folder::

    closedloop.yaml        engine URL, time zone, sources and their write keys, imports
    identity.yaml          identifier types, priorities, blocked values, never-link pairs
    traits/*.yaml          computed traits
    tags/*.yaml            tags
    segments/*.yaml        audiences
    campaigns/*.yaml       campaigns

Loading collects *every* problem (file, line, key, what was expected) before failing, so a
user fixes a project in one pass rather than one error per run.

One module per kind of definition; import from this package.
"""

from closedloop.core.definitions.base import NAME_PATTERN, Definition, birthday_of
from closedloop.core.definitions.campaigns import CampaignDef, Goal, Offer
from closedloop.core.definitions.channels import ChannelConfig, Transport
from closedloop.core.definitions.identity import (
    MATCH_FIELDS,
    IdentifierType,
    IdentityConfig,
    MatchingConfig,
    Normaliser,
)
from closedloop.core.definitions.loading import Project, load_project
from closedloop.core.definitions.policy import (
    Channel,
    ContactPolicy,
    DoNotDisturb,
    FrequencyCap,
    PolicyAction,
    QuietHours,
)
from closedloop.core.definitions.project import (
    DataClass,
    ImportFormat,
    ImportMapping,
    ImportSpec,
    ProjectConfig,
    Source,
)
from closedloop.core.definitions.segments import SegmentDef
from closedloop.core.definitions.tags import TagDef, TagRule
from closedloop.core.definitions.traits import Aggregation, TraitDef
from closedloop.core.definitions.variants import GlobalControl, Variant

__all__ = [
    "MATCH_FIELDS",
    "NAME_PATTERN",
    "Aggregation",
    "CampaignDef",
    "Channel",
    "ChannelConfig",
    "ContactPolicy",
    "DataClass",
    "Definition",
    "DoNotDisturb",
    "FrequencyCap",
    "GlobalControl",
    "Goal",
    "IdentifierType",
    "IdentityConfig",
    "ImportFormat",
    "ImportMapping",
    "ImportSpec",
    "MatchingConfig",
    "Normaliser",
    "Offer",
    "PolicyAction",
    "Project",
    "ProjectConfig",
    "QuietHours",
    "SegmentDef",
    "Source",
    "TagDef",
    "TagRule",
    "TraitDef",
    "Transport",
    "Variant",
    "birthday_of",
    "load_project",
]
