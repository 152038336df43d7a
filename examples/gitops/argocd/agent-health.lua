-- Argo CD health check for agentry.dev/Agent, following kstatus (sigs.k8s.io/cli-utils):
--   Healthy      Ready=True and status.observedGeneration == metadata.generation
--   Degraded     Stalled=True: the Agent cannot progress until it (or its namespace) changes
--   Progressing  anything else: no status yet, the controller has not seen this generation,
--                Reconciling=True, or Ready not (yet) True
-- Argo CD runs health checks without the string library: only base, table and package.
local hs = {}

local function condition(type)
  if obj.status == nil or obj.status.conditions == nil then
    return nil
  end
  for _, c in ipairs(obj.status.conditions) do
    if c.type == type then
      return c
    end
  end
  return nil
end

if obj.status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the controller to observe the Agent"
  return hs
end

local generation = obj.metadata.generation
local observed = obj.status.observedGeneration
if observed == nil or (generation ~= nil and observed ~= generation) then
  hs.status = "Progressing"
  if observed == nil or observed < 0 then
    hs.message = "Waiting for the controller to observe the Agent"
  else
    hs.message = "Waiting for the controller to observe generation " .. tostring(generation) ..
      " (observed " .. tostring(observed) .. ")"
  end
  return hs
end

local stalled = condition("Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = stalled.message or stalled.reason or "Stalled"
  return hs
end

local ready = condition("Ready")
if ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = ready.message or "Ready"
  return hs
end

hs.status = "Progressing"
local reconciling = condition("Reconciling")
if reconciling ~= nil and reconciling.status == "True" and reconciling.message ~= nil then
  hs.message = reconciling.message
elseif ready ~= nil and ready.message ~= nil then
  hs.message = ready.message
else
  hs.message = "Waiting for the Agent to become Ready"
end
return hs
