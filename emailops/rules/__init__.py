"""Operator rules: the TOML file, its validation, matching and reply templates."""

from emailops.rules.loader import RuleSetCache, load_rules
from emailops.rules.matching import matching_rules, rule_matches
from emailops.rules.model import ReplyAction, ReplySpec, Rule, RulesError, RuleSet
from emailops.rules.templates import PLACEHOLDERS, Template, TemplateError

__all__ = [
    "PLACEHOLDERS",
    "ReplyAction",
    "ReplySpec",
    "Rule",
    "RuleSet",
    "RuleSetCache",
    "RulesError",
    "Template",
    "TemplateError",
    "load_rules",
    "matching_rules",
    "rule_matches",
]
