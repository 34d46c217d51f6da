// Renders the formulas that pymdownx.arithmatex (generic mode) marks as \( ... \) and \[ ... \], with the KaTeX
// copy served by the site itself (docs/assets/katex, MIT licence), so the pages work offline.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
    throwOnError: false,
  });
});
