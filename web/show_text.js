// Shows the text a pack node returns in its "ui" payload ({"ui": {"text": [...]}}) inside the node:
// scores, the results table of Eval Report, where Save LoRA wrote its file.
// A read-only monospace <textarea> in a DOM widget of the node's own (node.addDOMWidget, the front end's public
// API: the classic canvas and Nodes 2.0 both show it); never saved into the workflow. The widget is made with the node,
// hidden until there is text: some front ends' Nodes 2.0 (1.35) draw only the widgets a node had when it was added.
import { app } from "../../scripts/app.js";

const WIDGET = "ft_result";
const LINE = 15; // px per line of the 12px monospace text
const PAD = 10; // the textarea's padding and border, top and bottom together
const MIN_LINES = 2;
const MAX_LINES = 16; // beyond this the text scrolls
const CHAR = 7.3; // px per character of that text (to count the lines a long one wraps into)

function setHidden(widget, hidden) {
  widget.hidden = hidden; // the canvas
  if (widget.options) widget.options.hidden = hidden; // the older front ends' Nodes 2.0 read it here
}

function textWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  const area = document.createElement("textarea");
  area.className = "ft-result-text";
  area.readOnly = true;
  area.spellcheck = false;
  area.style.cssText = [
    "width: 100%", "height: 100%", "box-sizing: border-box", "resize: none", "margin: 0", "padding: 4px",
    "font: 12px/15px monospace", "white-space: pre-wrap", "overflow-wrap: anywhere", "overflow: auto", "opacity: 0.85",
    "border-radius: 4px", "color: var(--input-text, #ddd)", "background: var(--comfy-input-bg, #222)",
    "border: 1px solid var(--border-color, #444)",
  ].join("; ");
  const height = () => { // the lines it shows, long ones wrapped at the node's width (which it never changes)
    const perLine = Math.max(10, Math.floor((node.size[0] - 40) / CHAR));
    const lines = area.value.split("\n").reduce((n, l) => n + Math.max(1, Math.ceil(l.length / perLine)), 0);
    return PAD + LINE * Math.min(MAX_LINES, Math.max(MIN_LINES, lines));
  };
  widget = node.addDOMWidget(WIDGET, "ft_text", area, {
    serialize: false,
    getValue: () => area.value,
    setValue: (v) => { area.value = v ?? ""; },
    getMinHeight: () => height() + 20,
    getMaxHeight: () => height() + 20,
  });
  widget.serialize = false; // output only: never saved into the workflow's widget values
  area.__ftHeight = height;
  setHidden(widget, true);
  return widget;
}

function showText(node, lines) {
  const widget = textWidget(node);
  setHidden(widget, false);
  widget.value = lines.join("\n"); // through the widget: Nodes 2.0 redraws it
  const area = widget.element;
  area.style.minHeight = `${area.__ftHeight()}px`; // Nodes 2.0 sizes the row from its content
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(size[0], node.size[0]), Math.max(size[1], node.size[1])]);
    node.setDirtyCanvas(true, true);
  });
}

app.registerExtension({
  name: "finetune.showText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("FT_")) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      textWidget(this);
      return r;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text);
    };
  },
});
