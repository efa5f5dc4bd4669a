"""Writing a `FileReport`, or the agent's `AnswerReport`, for people (wrapped text) and for
programs (JSON values); pure."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import Any

from sidecar.sources.workload_response import offer_words
from sidecar.tools.inspect.findings import Finding
from sidecar.tools.inspect.report import FileReport
from sidecar.tools.inspect.validity import iso
from sidecar.tools.inspect.workload import AnswerReport

_WRAP = 100


def to_json(report: FileReport) -> dict[str, Any]:
    leaf = report.chain[0] if report.chain else None
    return {
        "file": report.source,
        "kind": report.kind,
        "spiffe_id": leaf.view.spiffe_id if leaf else None,
        "not_before": iso(leaf.view.not_before) if leaf else None,
        "not_after": iso(leaf.view.not_after) if leaf else None,
        "seconds_left": leaf.validity.seconds_left if leaf else None,
        "validity": leaf.validity.words if leaf else None,
        "clock_skew_suspected": leaf.validity.skew_suspected if leaf else False,
        "subject": leaf.view.subject if leaf else None,
        "issuer": leaf.view.issuer if leaf else None,
        "sans": dict(leaf.view.sans) if leaf else None,
        "key": ({"type": leaf.view.key.type, "bits": leaf.view.key.bits,
                 "description": leaf.view.key.description} if leaf else None),
        "key_usage": list(leaf.view.key_usage) if leaf and leaf.view.key_usage is not None
        else None,
        "extended_key_usage": list(leaf.view.eku) if leaf and leaf.view.eku is not None
        else None,
        "basic_constraints": ({"ca": leaf.view.is_ca, "path_length": leaf.view.path_length}
                              if leaf else None),
        "chain": [{"subject": e.view.subject, "issuer": e.view.issuer, "serial": e.view.serial,
                   "not_before": iso(e.view.not_before), "not_after": iso(e.view.not_after),
                   "role": e.role, "key": e.view.key.description, "spiffe_id": e.view.spiffe_id}
                  for e in report.chain],
        "bundle": (None if report.bundle is None else
                   {"file": report.bundle, "verified": report.verified, "anchor": report.anchor}),
        "problems": report.problems,
        "details": [{"problem": f.name, "reason": f.reason, "message": f.message,
                     "explanation": f.reason.explanation if f.reason else None,
                     "fix": f.reason.fix if f.reason else None} for f in report.findings],
        "notes": list(report.notes),
    }


def _line(label: str, text: str, indent: int = 2) -> str:
    head = " " * indent + f"{label:<12} "
    return textwrap.fill(text, _WRAP, initial_indent=head,
                         subsequent_indent=" " * len(head), break_on_hyphens=False)


def render_text(report: FileReport) -> str:
    problems = list(dict.fromkeys(str(f.reason or f.name) for f in report.findings))
    lines = [f"{report.source}: " + (f"PROBLEM: {', '.join(problems)}" if problems else "OK")]
    if report.chain:
        lines += _describe_lines(report)
    for note in report.notes:
        lines.append(_line("note", note))
    lines += _problem_lines(report.findings)
    return "\n".join(lines)


def _describe_lines(report: FileReport) -> list[str]:
    leaf = report.chain[0]
    v = leaf.view
    sans = "; ".join(f"{kind.upper()} {value}" for kind, values in v.sans.items()
                     for value in values) or "none"
    basic = (f"yes (cA=true{'' if v.path_length is None else f', pathLen {v.path_length}'})"
             if v.is_ca else "no (cA=false)")
    lines = [
        _line("SPIFFE ID", v.spiffe_id or "none (see the problems below)"),
        _line("subject", v.subject),
        _line("issuer", v.issuer),
        _line("SANs", sans),
        _line("validity", f"{leaf.validity.words} ({iso(v.not_before)} to {iso(v.not_after)})"),
        _line("key", v.key.description),
        _line("key usage", "absent" if v.key_usage is None else
              (", ".join(v.key_usage) or "empty") + (" (critical)" if v.key_usage_critical
                                                     else " (not critical)")),
        _line("EKU", "absent (any use)" if v.eku is None else ", ".join(v.eku) or "empty"),
        _line("CA", basic),
        _line("chain", f"{len(report.chain)} certificate(s) in the file, in file order"),
    ]
    pad = " " * 15
    for n, e in enumerate(report.chain, 1):
        lines += [f"{pad}{n}. {e.role}: {e.view.subject}",
                  f"{pad}   serial {e.view.serial}, {e.view.key.description}, "
                  f"{e.validity.words} (not after {iso(e.view.not_after)})",
                  f"{pad}   issued by {e.view.issuer}"]
    if report.bundle is not None:
        lines.append(_line("bundle", f"{report.bundle}: " + (
            f"verifies, up to '{report.anchor}'" if report.anchor else
            "does NOT verify (see the problem below)")))
    return lines


def _problem_lines(findings: Sequence[Finding]) -> list[str]:
    lines: list[str] = []
    groups: dict[str, list[Finding]] = {}
    for f in findings:
        groups.setdefault(str(f.reason or f.name), []).append(f)
    for name, group in groups.items():
        lines.append(_line("problem", name))
        for f in group:
            rule = f"{f.name}: " if f.name != name else ""
            lines.append(textwrap.fill(f"- {rule}{f.message}", _WRAP, initial_indent=" " * 4,
                                       subsequent_indent=" " * 6, break_on_hyphens=False))
        reason = group[0].reason
        if reason is not None:
            lines.append(_line("means", reason.explanation, indent=4))
            lines.append(_line("fix", reason.fix, indent=4))
    return lines


def answer_text(answer: AnswerReport) -> str:
    """The agent's answer for people: a summary, each SVID shown, each bundle, the CRLs."""
    problems = answer.problems
    chosen = answer.chosen
    why = (f"named by {answer.wanted_by}" if answer.wanted else
           "the only one" if len(answer.offered) == 1 else
           "the first; identity.spiffe_id (or --spiffe-id here) picks another")
    head = [f"Workload API {answer.address}: "
            + (f"PROBLEM: {', '.join(problems)}" if problems else "OK"),
            _line("offers", f"{len(answer.offered)} SVID(s): "
                  + ", ".join(offer_words(i, h) for i, h in answer.offered)),
            _line("run takes", f"{offer_words(chosen.spiffe_id, chosen.hint)} ({why})")]
    sections = ["\n".join(head)]
    for s in answer.svids:
        lines = [render_text(s.report),
                 _line("run", "would NOT take it:" if s.refused else "would take it")]
        lines += [textwrap.fill(f"- {p}", _WRAP, initial_indent=" " * 4,
                                subsequent_indent=" " * 6, break_on_hyphens=False)
                  for p in s.refused]
        sections.append("\n".join(lines))
    sections += [render_text(b.report) for b in answer.bundles]
    crls = [_line(f"CRL {n}", (c.problem or "unreadable") if c.issuer is None else
                  f"from '{c.issuer}', {c.revoked} revoked, updated "
                  f"{iso(c.last_update) if c.last_update else '?'}, next update "
                  f"{iso(c.next_update) if c.next_update else 'none'}")
            for n, c in enumerate(answer.crls, 1)]
    sections.append("CRLs: " + ("none" if not crls else f"{len(crls)}\n" + "\n".join(crls)))
    return "\n\n".join(sections)


def answer_json(answer: AnswerReport) -> dict[str, Any]:
    """The agent's answer for programs: one object, each report as `to_json` writes a
    file's."""
    return {
        "workload_api": answer.address,
        "spiffe_id_wanted": answer.wanted,
        "problems": answer.problems,
        "offered": [{"spiffe_id": i, "hint": h} for i, h in answer.offered],
        "svids": [{"spiffe_id": s.spiffe_id, "hint": s.hint, "chosen": s.chosen,
                   "run_takes_it": not s.refused, "run_refuses_because": list(s.refused),
                   "report": to_json(s.report)} for s in answer.svids],
        "bundles": [{"trust_domain": b.trust_domain, "federated": b.federated,
                     "report": to_json(b.report)} for b in answer.bundles],
        "crls": [{"issuer": c.issuer, "revoked": c.revoked,
                  "last_update": iso(c.last_update) if c.last_update else None,
                  "next_update": iso(c.next_update) if c.next_update else None,
                  "problem": c.problem} for c in answer.crls],
    }
