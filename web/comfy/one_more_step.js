// One More Step: show what OMS skipped as a toast (the server sends "one_more_step.notice").
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

app.registerExtension({
    name: "OneMoreStep.Notices",
    setup() {
        api.addEventListener("one_more_step.notice", (event) => {
            const toast = app.extensionManager?.toast;
            if (toast) {
                toast.add({
                    severity: event.detail.severity || "warn",
                    summary: "One More Step",
                    detail: event.detail.text,
                    life: 8000,
                });
            }
        });
    },
});
