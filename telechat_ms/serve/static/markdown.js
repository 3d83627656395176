// A small Markdown renderer that builds DOM nodes only (createElement + text nodes, never HTML strings), so model
// output can never become markup: `<script>` stays the text "<script>". Supported: fenced code, headings, lists,
// block quotes, rules, paragraphs with line breaks, `code`, **bold**, *italic*, and [links](https://...) whose
// address is http(s) or mailto (anything else is shown as text). Unfinished constructs (a fence still streaming)
// render as far as they go.
"use strict";

const TeleMarkdown = (() => {
  const SAFE_URL = /^(https?:\/\/|mailto:)/i;

  function el(tag, parent, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (parent) parent.appendChild(node);
    return node;
  }

  function text(parent, value) {
    parent.appendChild(document.createTextNode(value));
  }

  // Inline spans: code first (its content is literal), then links, bold, italic; the rest is text.
  const INLINE = /(`+)([\s\S]*?[^`])\1(?!`)|\[([^\]\n]+)\]\(([^)\s]+)\)|\*\*([^*\n][\s\S]*?)\*\*|\*([^*\s][^*\n]*?)\*/;

  function inline(parent, source) {
    let rest = source;
    while (rest) {
      const m = INLINE.exec(rest);
      if (!m) {
        text(parent, rest);
        return;
      }
      if (m.index) text(parent, rest.slice(0, m.index));
      if (m[1]) {
        el("code", parent).textContent = m[2];
      } else if (m[3] !== undefined) {
        if (SAFE_URL.test(m[4])) {
          const a = el("a", parent);
          a.href = m[4];
          a.target = "_blank";
          a.rel = "noopener noreferrer nofollow";
          inline(a, m[3]);
        } else {
          text(parent, m[0]);
        }
      } else if (m[5] !== undefined) {
        inline(el("strong", parent), m[5]);
      } else {
        inline(el("em", parent), m[6]);
      }
      rest = rest.slice(m.index + m[0].length);
    }
  }

  function paragraph(parent, lines) {
    const p = el("p", parent);
    lines.forEach((line, i) => {
      if (i) el("br", p);
      inline(p, line);
    });
  }

  const FENCE = /^\s*(```+|~~~+)\s*([\w+#.-]*)\s*$/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBERED = /^\s*(\d{1,9})[.)]\s+(.*)$/;
  const QUOTE = /^\s*>\s?(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;

  function blocks(parent, source) {
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if ((m = FENCE.exec(line))) {
        const close = m[1];
        const body = [];
        i += 1;
        while (i < lines.length && !(lines[i].trim().startsWith(close[0].repeat(3)) &&
                                     lines[i].trim().replace(/[`~]/g, "") === "")) {
          body.push(lines[i]);
          i += 1;
        }
        i += 1;  // the closing fence (or the end of a fence still streaming)
        const pre = el("pre", parent);
        const code = el("code", pre);
        if (m[2]) code.dataset.lang = m[2];
        code.textContent = body.join("\n");
      } else if (!line.trim()) {
        i += 1;
      } else if ((m = HEADING.exec(line))) {
        inline(el("h" + Math.min(m[1].length + 2, 6), parent), m[2]);
        i += 1;
      } else if (RULE.test(line)) {
        el("hr", parent);
        i += 1;
      } else if (QUOTE.test(line)) {
        const quoted = [];
        while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
          quoted.push(m[1]);
          i += 1;
        }
        blocks(el("blockquote", parent), quoted.join("\n"));
      } else if (BULLET.test(line) || NUMBERED.test(line)) {
        const ordered = !BULLET.test(line);
        const pattern = ordered ? NUMBERED : BULLET;
        const list = el(ordered ? "ol" : "ul", parent);
        if (ordered) {
          const start = parseInt(NUMBERED.exec(line)[1], 10);
          if (start !== 1) list.start = start;
        }
        while (i < lines.length && (m = pattern.exec(lines[i]))) {
          inline(el("li", list), ordered ? m[2] : m[1]);
          i += 1;
        }
      } else {
        const para = [];
        while (i < lines.length && lines[i].trim() && !FENCE.test(lines[i]) && !HEADING.test(lines[i]) &&
               !BULLET.test(lines[i]) && !NUMBERED.test(lines[i]) && !QUOTE.test(lines[i]) && !RULE.test(lines[i])) {
          para.push(lines[i]);
          i += 1;
        }
        paragraph(parent, para);
      }
    }
  }

  // A DocumentFragment for `source`; every character of the model's text ends up in a text node.
  function render(source) {
    const fragment = document.createDocumentFragment();
    blocks(fragment, source);
    return fragment;
  }

  return { render };
})();
