"""The built-in lesson generator: a deterministic template generator, not a language model.

It turns the request into a well-formed, structured lesson with no network access, so the whole
pipeline runs offline. The module is a planner (`plan` and `write_section`, so each section is a job
of its own); `generate_lesson` is the same lesson in one step. Replace it with
DYLEN_LESSON_GENERATOR=module:attr (the contract: common.lessons.generation).
"""

from __future__ import annotations

import hashlib
from typing import Any

from common.lessons.generation import SECTIONS_BY_DEPTH, LessonRequest

_ANGLES = (
    ("What {t} is", "{T} is best understood by starting from its core idea and the problem it solves."),
    ("Why {t} matters", "Knowing {t} pays off whenever you meet the situations it was made for."),
    ("Key terms in {t}", "A handful of precise terms make every later explanation of {t} shorter."),
    ("How {t} works", "Step by step, {t} follows a small number of rules that compose."),
    ("A worked example of {t}", "Walking through one concrete case makes the rules of {t} tangible."),
    ("Common mistakes with {t}", "Most errors with {t} come from a few recurring misunderstandings."),
    ("{T} in practice", "In real work, {t} shows up in routines, tools and decisions."),
    ("Comparing {t} with alternatives", "Seeing what {t} is not sharpens what it is."),
    ("Practising {t}", "Deliberate practice with feedback is the fastest way to fluency in {t}."),
    ("Where to go after {t}", "Once {t} is familiar, related topics open up naturally."),
)


def _fmt(template: str, topic: str) -> str:
    return template.format(t=topic, T=topic[:1].upper() + topic[1:])


def _seed(topic: str) -> int:
    # Same request, same lesson: a stable seed rotates which angles and quiz answers appear.
    return int(hashlib.sha256(topic.encode("utf-8")).hexdigest()[:8], 16)


def plan(request: LessonRequest) -> dict[str, Any]:
    """The lesson's outline: title, summary and one brief (heading, body) per section."""
    topic = request.topic
    count = SECTIONS_BY_DEPTH[request.depth]
    seed = _seed(topic)
    briefs = []
    for index in range(count):
        heading_t, body_t = _ANGLES[(seed + index) % len(_ANGLES)] if count < len(_ANGLES) else _ANGLES[index]
        body = _fmt(body_t, topic)
        if request.details:
            body += f" With your focus in mind ({request.details}), look for how this applies."
        briefs.append({"heading": _fmt(heading_t, topic), "body": body})
    return {
        "title": f"{_fmt('{T}', topic)}: {request.depth} lesson",
        "summary": f"A {count}-part {request.depth} lesson on {topic}"
        + (f", focused on {request.details}." if request.details else "."),
        "language": request.language,
        "depth": request.depth,
        "generator": "dylen-template-v1",
        "sections": briefs,
    }


def write_section(request: LessonRequest, plan: dict[str, Any], index: int) -> dict[str, Any]:
    """Section `index` of `plan`: its brief, key points and a quiz."""
    topic = request.topic
    heading = plan["sections"][index]["heading"]
    options = [
        f"It is central to {heading.lower()}",
        "It is unrelated to the topic",
        "It only matters in rare edge cases",
    ]
    answer = (_seed(topic) + index) % len(options)
    options[0], options[answer] = options[answer], options[0]
    return {
        "heading": heading,
        "body": plan["sections"][index]["body"],
        "key_points": [
            f"{heading}: the one idea to remember.",
            f"Connect it to what you already know about {topic}.",
            "Check yourself with the quiz below.",
        ],
        "quiz": {
            "question": f"Which statement best describes '{heading}'?",
            "options": options,
            "answer_index": answer,
        },
    }


def generate_lesson(request: LessonRequest) -> dict[str, Any]:
    """The same lesson in one step (the plain-callable form of the contract)."""
    outline = plan(request)
    sections = [write_section(request, outline, index) for index in range(len(outline["sections"]))]
    return {**outline, "sections": sections}
