// Shows the text a pack node returns in its "ui" payload ({"ui": {"text": [...]}}) inside the node:
// scores, the results table of Eval Report, where Save LoRA wrote its file.
import { app } from "../../scripts/app.js";
import { ComfyWidgets } from "../../scripts/widgets.js";

const WIDGET = "ft_result";

function showText(node, lines) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (!widget) {
    widget = ComfyWidgets["STRING"](node, WIDGET, ["STRING", { multiline: true }], app).widget;
    widget.serialize = false; // output only: never saved into the workflow's widget values
    if (widget.inputEl) {
      widget.inputEl.readOnly = true;
      widget.inputEl.style.opacity = 0.85;
      widget.inputEl.style.fontFamily = "monospace";
    }
  }
  widget.value = lines.join("\n");
  requestAnimationFrame(() => {
    const size = node.computeSize();
    node.setSize([Math.max(size[0], node.size[0]), Math.max(size[1], node.size[1])]);
    node.setDirtyCanvas(true, false);
  });
}

app.registerExtension({
  name: "finetune.showText",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("FT_")) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      if (message?.text?.length) showText(this, message.text);
    };
  },
});
