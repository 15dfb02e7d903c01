"""Ready-made command-lifecycle callbacks: safety policy, prompt-injection filter, audit log.

- :class:`SafetyGuard` parses each command with bashlex and vetoes destructive ones.
- :class:`PromptInjectionGuard` vetoes commands a text classifier labels as injection.
- :class:`AuditLog` records every command (including blocked ones) in SQLite.

None of them imports a machine-learning library; the classifier is passed in.
"""

from __future__ import annotations

from smolvm.guards.audit import AuditLog, AuditRecord, AuditStore
from smolvm.guards.injection import InjectionVerdict, PromptInjectionGuard
from smolvm.guards.safety import (
    RULES,
    Rule,
    SafetyGuard,
    SafetyPolicy,
    SimpleCommand,
    Verdict,
    check_command,
)

__all__ = [
    "AuditLog",
    "AuditRecord",
    "AuditStore",
    "InjectionVerdict",
    "PromptInjectionGuard",
    "RULES",
    "Rule",
    "SafetyGuard",
    "SafetyPolicy",
    "SimpleCommand",
    "Verdict",
    "check_command",
]
