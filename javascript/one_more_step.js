// One More Step: tooltips for the txt2img accordion. Everything lives in one namespace.
const OneMoreStep = {
    tooltips: {
        oms_enabled: "Run the One More Step module once before sampling, so brightness and colour follow the prompt.",
        oms_prompt: "Text the OMS module reads. Empty = each image's own prompt, with (weights:1.2), [edits] and <lora:...> tags removed. Try 'dark', 'bright', 'red car'.",
        oms_negative_prompt: "Unconditional text for OMS guidance. Empty = the authors' default.",
        oms_cfg: "OMS guidance scale. 1 = no guidance; about 2 already changes brightness and colour clearly.",
        oms_module: "Auto = the module for the loaded checkpoint (SD1.x/SD2.x or SDXL). Modules in models/oms are listed too; missing ones are downloaded on first use.",
        oms_refresh: "Rescan the models folder for OMS modules.",
        oms_noise_mode: "Keep seed noise: same composition as without OMS (s = 0). Fresh noise: the authors' stochastic step, noise drawn from the image seed.",
    },

    addTooltips() {
        for (const [id, text] of Object.entries(OneMoreStep.tooltips)) {
            for (const suffix of ["", "-checkbox"]) {
                const element = gradioApp().getElementById(id + suffix);
                if (element && !element.title) {
                    element.title = text;
                }
            }
        }
    },
};

onUiLoaded(OneMoreStep.addTooltips);
