"""Alembic environment: always driven programmatically by `Store.migrate()`, which hands
us an open connection inside its transaction."""

from alembic import context

from auraserve.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
    # Store.migrate(on_step=...): the CLI's progress bar counts revisions as they apply.
    on_version_apply=context.config.attributes.get("on_version_apply"),
)
context.run_migrations()
