// Broadcaster browser client (placeholder).
