"""The nightly regression's alert: a Prefect automation that turns the event
`recipe-lab.nightly.regression` into a notification.

The notification goes through any Prefect notification block (Slack, email, Teams, a custom
webhook...). `lab serve` wires it: with `--alert-block NAME` to a block made in the UI, or with
the URL in $RECIPE_LAB_ALERT_WEBHOOK to a custom-webhook block it saves. The URL comes from the
environment only: webhook URLs usually carry their token. By hand, the same automation is one
`prefect automation create` (README, "Nightly regression").
"""

from __future__ import annotations

import os
from uuid import UUID

from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.client.orchestration import get_client
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from tasks.nightly import REGRESSION_EVENT

AUTOMATION = "recipe-lab nightly regression"
WEBHOOK_BLOCK = "recipe-lab-alert-webhook"
WEBHOOK_ENV = "RECIPE_LAB_ALERT_WEBHOOK"
SUBJECT = "recipe-lab nightly regression: {{ event.resource.name }}"
# Jinja over the event (tasks.nightly.alert_regression writes its payload).
BODY = (
    "Nightly run {{ event.payload.run_id }} of {{ event.resource.name }} regressed against the last good "
    "night {{ event.payload.baseline_run_id }}:\n"
    "{% for r in event.payload.regressions %}- {{ r.metric }}: {{ r.value }} (last good {{ r.baseline }}, "
    "tolerance {{ r.tolerance }})\n{% endfor %}"
)


def save_webhook_block(url: str) -> UUID:
    """A custom-webhook notification block that POSTs {"subject", "body"} as JSON to `url`,
    saved (overwritten) as WEBHOOK_BLOCK; its id."""
    block = CustomWebhookNotificationBlock(
        name="recipe-lab", url=url, json_data={"subject": "{{subject}}", "body": "{{body}}"}
    )
    return block.save(WEBHOOK_BLOCK, overwrite=True)


def notification_block_id(block_name: str | None) -> UUID | None:
    """The block alerts go to: `block_name` (a saved notification block, "type/name" or a
    custom-webhook block's name), else a webhook block for $RECIPE_LAB_ALERT_WEBHOOK, else None."""
    if block_name:
        slug = block_name if "/" in block_name else f"custom-webhook/{block_name}"
        return Block.load(slug)._block_document_id
    url = os.environ.get(WEBHOOK_ENV)
    return save_webhook_block(url) if url else None


def regression_automation(block_document_id: UUID) -> AutomationCore:
    """Every regression event, at once, becomes one notification through the block."""
    return AutomationCore(
        name=AUTOMATION,
        description=f"Notify on {REGRESSION_EVENT} (emitted by the nightly-regression flow).",
        trigger=EventTrigger(expect={REGRESSION_EVENT}, posture=Posture.Reactive, threshold=1),
        actions=[SendNotification(block_document_id=block_document_id, subject=SUBJECT, body=BODY)],
    )


def ensure_regression_alert(block_document_id: UUID) -> UUID:
    """Create the automation, or bring the one of that name up to date (and drop duplicates made
    by hand): however often it runs, one automation remains. Its id."""
    automation = regression_automation(block_document_id)
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(AUTOMATION)
        if not existing:
            return client.create_automation(automation)
        kept, *duplicates = sorted(existing, key=lambda a: str(a.id))
        client.update_automation(kept.id, automation)
        for duplicate in duplicates:
            client.delete_automation(duplicate.id)
        return kept.id
