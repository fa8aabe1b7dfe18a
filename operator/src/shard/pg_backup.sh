# One scheduled backup of a shard's managed Postgres (run by the Shard's backup CronJob with
# `sh -c`): a pg_dump in custom format into BACKUP_DIR, written under a temporary name and
# renamed only once complete (a failed run leaves no truncated dump behind), then the dumps
# older than RETENTION_DAYS days deleted; the newest is always kept.
set -eu
stamp=$(date -u +%Y%m%dT%H%M%SZ)
part="$BACKUP_DIR/.omega-$stamp.dump.partial"
trap 'rm -f "$part"' EXIT
pg_dump --format=custom --file "$part" "$DATABASE_URL"
mv "$part" "$BACKUP_DIR/omega-$stamp.dump"
find "$BACKUP_DIR" -maxdepth 1 -name 'omega-*.dump' ! -name "omega-$stamp.dump" \
  -mtime +"$((RETENTION_DAYS - 1))" -print -delete
echo "backup: $BACKUP_DIR/omega-$stamp.dump"
