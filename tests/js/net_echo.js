// Node's `net` (libuv: epoll, non-blocking sockets, and every close a raw
// syscall(SYS_close)) with both ends in this process, one connection after another:
// echoes of several sizes with a half-close from each side and a paused reader, then a
// client that destroys its socket and a server that must see it. Prints what it saw (no
// ports, no timings); at the last echo's end it prints SYNC and waits for a line on stdin
// while a connection with bytes is open (the test reads `sdp stat` then).
'use strict';
const net = require('net');
const crypto = require('crypto');
const md5 = (b) => crypto.createHash('md5').update(b).digest('hex');

function pattern(n, seed) {
  const b = Buffer.alloc(n);
  let x = seed;
  for (let i = 0; i < n; i++) { x = (x * 1103515245 + 12345) & 0x7fffffff; b[i] = x >> 16; }
  return b;
}

// One echo of `total` bytes; `hold`: stop at SYNC before the client ends.
function echo(total, seed, hold) {
  return new Promise((done) => {
    const events = [];
    const srv = net.createServer({ allowHalfOpen: true }, (s) => {
      s.on('data', (d) => s.write(d));
      s.on('end', () => { events.push('server end'); s.end('BYE'); });
      s.on('close', () => { events.push('server close'); srv.close(); });
    });
    srv.listen(0, '127.0.0.1', () => {
      const sent = pattern(total, seed);
      const got = [];
      let n = 0;
      let paused = false;
      const c = net.connect({ port: srv.address().port, host: '127.0.0.1', allowHalfOpen: true }, () => c.write(sent));
      c.on('data', (d) => {
        got.push(d);
        n += d.length;
        if (!paused && n > 1 << 20) { paused = true; c.pause(); setTimeout(() => c.resume(), 50); }
        if (n === total) {
          const finish = () => { events.push('client all echoed'); c.end(); };
          if (hold) {
            console.log('SYNC');
            process.stdin.once('data', finish);
          } else {
            finish();
          }
        }
      });
      c.on('end', () => events.push('client end'));
      c.on('close', () => {
        const all = Buffer.concat(got);
        console.log(`echo of ${total}: same bytes ${md5(all.subarray(0, total)) === md5(sent)}, ` +
          `then ${JSON.stringify(all.subarray(total).toString())}; ${events.join(', ')}`);
        done();
      });
    });
  });
}

// The client destroys its socket (a close with nothing queued): the server sees its end.
function destroyed() {
  return new Promise((done) => {
    const srv = net.createServer((s) => {
      s.on('end', () => console.log('destroyed client: server sees end'));
      s.on('close', () => { console.log('destroyed client: server closes'); srv.close(done); });
      s.write('hello');
    });
    srv.listen(0, '127.0.0.1', () => {
      const c = net.connect(srv.address().port, '127.0.0.1');
      c.once('data', () => c.destroy());
    });
  });
}

(async () => {
  for (const [i, total] of [1, 100000, 5544698, 70000].entries()) {
    await echo(total, i + 1, false);
  }
  await destroyed();
  await echo(3000000, 9, true);
  process.stdin.pause();
  console.log('done');
})();
setTimeout(() => { console.log('TIMEOUT'); process.exit(3); }, 50000).unref();
