// One More Step: tooltips for the txt2img accordion. Everything lives in one namespace.
const OneMoreStep = {
    tooltips: {
        oms_enabled: "Before sampling, One More Step predicts the picture's overall light and colour from the prompt and starts the sampler there: dark prompts come out truly dark, bright ones truly bright.",
        oms_prompt: "What One More Step reads. Empty = each image's own prompt, read as the WebUI reads it at the first step ((weights), [edits], AND, <lora:...> tags). Try 'dark', 'bright white', 'red'.",
        oms_negative_prompt: "What One More Step steers away from. Usually left empty.",
        oms_cfg: "How strongly the OMS prompt steers light and colour. 1 = no extra push; 2 to 4 = clearly stronger; below 1 fades toward a guess without the prompt (0 ignores it).",
        oms_module: "Auto = the module made for the loaded checkpoint (SD1.x/SD2.x or SDXL). The list below says which modules are on disk; a missing one downloads the first time it is needed.",
        oms_refresh: "Look for modules in the OMS models folder again.",
        oms_noise_mode: "Keep seed noise: the same composition as without One More Step, only light and colour change. Fresh noise: new noise drawn from the seed, so the composition changes too.",
        oms_preview: "After the images, show a small picture of what One More Step predicted (the light and colour layout the sampler starts from). Not saved, not written into the images.",
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
