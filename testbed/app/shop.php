<?php
// The NHSR-OSW commodity app: add, find, search, buy, modify, delete over SQLite with a Redis
// cache in front of find. Every answer is JSON with a Content-Length (no chunking).
declare(strict_types=1);

function reply(int $code, array $body): void {
    http_response_code($code);
    $json = json_encode($body);
    header('Content-Type: application/json');
    header('Content-Length: ' . strlen($json));
    echo $json;
    exit;
}

function db(): PDO {
    static $pdo = null;
    if ($pdo === null) {
        $pdo = new PDO('sqlite:' . $_SERVER['SHOP_DB'], null, null, [PDO::ATTR_ERRMODE => PDO::ERRMODE_EXCEPTION]);
        $pdo->exec('PRAGMA busy_timeout = 10000');
        $pdo->exec('PRAGMA journal_mode = WAL');
    }
    return $pdo;
}

function cache(): Redis {
    static $r = null;
    if ($r === null) {
        $r = new Redis();
        $r->connect($_SERVER['SHOP_REDIS_HOST'], (int)$_SERVER['SHOP_REDIS_PORT'], 2.0);
    }
    return $r;
}

function item_id(): int {
    $id = (int)($_GET['id'] ?? 0);
    if ($id <= 0) reply(400, ['error' => 'id must be a positive integer']);
    return $id;
}

$op = $_GET['op'] ?? '';
try {
    switch ($op) {
        case 'ping':
            reply(200, ['ok' => true, 'server' => $_SERVER['SHOP_NAME']]);
        case 'seed':
            $n = max(1, (int)($_GET['n'] ?? 100));
            $pdo = db();
            $pdo->exec('CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, price REAL NOT NULL, stock INTEGER NOT NULL)');
            $pdo->exec('CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL, qty INTEGER NOT NULL, ts INTEGER NOT NULL)');
            $pdo->beginTransaction();
            $pdo->exec('DELETE FROM orders');
            $pdo->exec('DELETE FROM items');
            $ins = $pdo->prepare('INSERT INTO items (id, name, price, stock) VALUES (?, ?, ?, ?)');
            for ($i = 1; $i <= $n; $i++) $ins->execute([$i, "item-$i", 1.0 + $i % 97, 1000000]);
            $pdo->commit();
            cache()->flushDB();
            reply(200, ['seeded' => $n]);
        case 'add':
            $name = (string)($_GET['name'] ?? '');
            if ($name === '') reply(400, ['error' => 'name required']);
            $st = db()->prepare('INSERT INTO items (name, price, stock) VALUES (?, ?, ?)');
            $st->execute([$name, (float)($_GET['price'] ?? 1), (int)($_GET['stock'] ?? 100)]);
            reply(200, ['id' => (int)db()->lastInsertId()]);
        case 'find':
            $id = item_id();
            $key = "item:$id";
            $hit = cache()->get($key);
            if ($hit !== false) {
                header('X-Cache: HIT');
                reply(200, json_decode($hit, true));
            }
            $st = db()->prepare('SELECT id, name, price, stock FROM items WHERE id = ?');
            $st->execute([$id]);
            $row = $st->fetch(PDO::FETCH_ASSOC);
            if (!$row) reply(404, ['error' => 'no such item']);
            cache()->setex($key, 60, json_encode($row));
            header('X-Cache: MISS');
            reply(200, $row);
        case 'search':
            $q = (string)($_GET['q'] ?? '');
            $st = db()->prepare('SELECT id, name, price FROM items WHERE name LIKE ? ORDER BY id LIMIT 10');
            $st->execute(["%$q%"]);
            reply(200, ['items' => $st->fetchAll(PDO::FETCH_ASSOC)]);
        case 'buy':
            $id = item_id();
            $qty = max(1, (int)($_GET['qty'] ?? 1));
            $pdo = db();
            $pdo->exec('BEGIN IMMEDIATE');
            $st = $pdo->prepare('UPDATE items SET stock = stock - ? WHERE id = ? AND stock >= ?');
            $st->execute([$qty, $id, $qty]);
            if ($st->rowCount() === 0) {
                $pdo->exec('ROLLBACK');
                reply(409, ['error' => 'no such item or not enough stock']);
            }
            $pdo->prepare('INSERT INTO orders (item_id, qty, ts) VALUES (?, ?, ?)')->execute([$id, $qty, time()]);
            $order = (int)$pdo->lastInsertId();
            $pdo->exec('COMMIT');
            cache()->del("item:$id");
            reply(200, ['order' => $order]);
        case 'modify':
            $id = item_id();
            $st = db()->prepare('UPDATE items SET price = ? WHERE id = ?');
            $st->execute([(float)($_GET['price'] ?? 1), $id]);
            cache()->del("item:$id");
            reply($st->rowCount() ? 200 : 404, ['modified' => $st->rowCount()]);
        case 'delete':
            $id = item_id();
            $st = db()->prepare('DELETE FROM items WHERE id = ?');
            $st->execute([$id]);
            cache()->del("item:$id");
            reply($st->rowCount() ? 200 : 404, ['deleted' => $st->rowCount()]);
        default:
            reply(400, ['error' => 'unknown op']);
    }
} catch (Throwable $e) {
    error_log('shop: ' . $e->getMessage());
    reply(500, ['error' => $e->getMessage()]);
}
