// PLADIS: hover tooltips for the accordion controls (txt2img and img2img tabs).
// Loaded by the WebUI into <head>; runs once the UI exists. Texts mirror pladis/webui/ui.py TOOLTIPS.
(function () {
    "use strict";

    const PLADIS_TOOLTIPS = {
        enable: "PLADIS: sparse (α-entmax) cross-attention blend, no extra model calls",
        alpha: "Entmax exponent: 1 = softmax (no effect) · 1.5 = entmax15 (paper) · 2 = sparsemax (paper)",
        lambda: "Blend (1-λ)·softmax + λ·entmax: 0 = off, 1 = pure sparse, 2 = paper default, higher = stronger",
        layers: "UNet cross-attention groups to change; the paper's default is down + up (mid excluded)",
        start: "Where PLADIS starts: fraction of the steps (A1111) or of the noise schedule (Forge)",
        end: "Where PLADIS stops: fraction of the steps (A1111) or of the noise schedule (Forge); 1 = to the end",
    };

    function pladisApplyTooltips() {
        for (const tab of ["txt2img", "img2img"]) {
            for (const [suffix, text] of Object.entries(PLADIS_TOOLTIPS)) {
                const block = document.getElementById(`script_${tab}_pladis_${suffix}`);
                // the accordion gets its tooltip on the header only, not over the whole panel
                const element = block && suffix === "enable" ? block.querySelector(".label-wrap") || block : block;
                if (element && !element.title) {
                    element.title = text;
                }
            }
        }
    }

    if (typeof onUiLoaded === "function") {
        onUiLoaded(pladisApplyTooltips);
    } else {
        document.addEventListener("DOMContentLoaded", () => setTimeout(pladisApplyTooltips, 2000));
    }
})();
