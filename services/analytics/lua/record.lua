-- The write of one tenant's part of a RecordBatch: all or nothing, and at most once per
-- batch id (services/analytics/ingest.py builds the arguments; docs/analytics.md explains).
--
-- KEYS[1]: the batch key.
-- ARGV[1]: how long the batch key lives (seconds); ARGV[2]: the ops as JSON; ARGV[3]: the
-- record increments, little-endian doubles; ARGV[4]: the tenant's key prefix
-- "lp:{<tenant>}:an"; ARGV[5], ARGV[6]: how long after its start a minute bucket and an
-- hour bucket expire.
--
-- An op is [op, minute start, key suffix, [field, ...], [increment, ...]]: each increment
-- goes to its field in the hash <prefix>:m:<minute start><suffix> and in the hash
-- <prefix>:h:<its hour's start><suffix> (the roll-up). op 0: the field holds an integer
-- and the increment is a number. op n > 0: the field holds a record of n doubles and the
-- increment is the 1-based offset of n doubles in ARGV[3], added element-wise (a new field
-- simply takes them).
--
-- The hashes' names are built here rather than passed as KEYS (packing ~400 arguments cost
-- the service more than the whole JSON); they all carry the tenant's hash tag, as the
-- declared batch key does, so they are in its cluster slot. One HMGET and one HSET per
-- hash: the script runs atomically, so read-add-write is as safe as HINCRBY, and cheaper
-- than one HINCRBY per field. EXPIREAT only when HSET created a field: a hash without a new
-- field existed already, and this script (its only writer) gave it its expiry then. Redis
-- writes a Lua number as "%.17g", so integers stay integers.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local ops, blob, prefix = cjson.decode(ARGV[2]), ARGV[3], ARGV[4]
local minute_life, hour_life = tonumber(ARGV[5]), tonumber(ARGV[6])
local call, tonum, rep, sub = redis.call, tonumber, string.rep, string.sub
local spack, sunpack = struct.pack, struct.unpack
local formats = {}
local function fmt(n)
  local f = formats[n]
  if not f then f = '<' .. rep('d', n); formats[n] = f end
  return f
end
local function apply(op, h, expire_at, fields, incs)
  local cur = call('HMGET', h, unpack(fields))
  local out, j = {}, 0
  for i = 1, #fields do
    local old, inc = cur[i], incs[i]
    out[j + 1] = fields[i]
    if op == 0 then
      out[j + 2] = (tonum(old) or 0) + inc
    elseif not old then
      out[j + 2] = sub(blob, inc, inc + 8 * op - 1)
    else
      local add = {sunpack(fmt(op), blob, inc)}
      local vals = {sunpack(fmt(#old / 8), old)}
      vals[#vals] = nil  -- unpack's last result is the next position
      for k = 1, op do vals[k] = (vals[k] or 0) + add[k] end
      out[j + 2] = spack(fmt(#vals), unpack(vals))
    end
    j = j + 2
  end
  if call('HSET', h, unpack(out)) > 0 then call('EXPIREAT', h, expire_at) end
end
for k = 1, #ops do
  local op = ops[k]
  local start, suffix = op[2], op[3]
  local hour = start - start % 3600
  apply(op[1], prefix .. ':m:' .. start .. suffix, start + minute_life, op[4], op[5])
  apply(op[1], prefix .. ':h:' .. hour .. suffix, hour + hour_life, op[4], op[5])
end
return 1
